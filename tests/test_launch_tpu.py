"""Tests of launch/tpu.py: dry runs, setting checks, the supervise loop, and the remote scripts.

No gcloud is needed: dry runs print commands, and the supervisor gets a scripted runner.
The remote run/status/stop scripts are executed for real with a fake venv under a temp $HOME.
"""

import importlib.util
import io
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu.py")

_spec = importlib.util.spec_from_file_location("launch_tpu", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
sys.modules["launch_tpu"] = tpu  # dataclasses need the module registered
_spec.loader.exec_module(tpu)

BASE = ["--project=my-proj", "--zone=us-central2-b", "--name=mae-pod"]
GIT = ["--git-url=https://github.com/example/mae-jax.git", "--git-rev=0123abcd"]
# The two examples of the issue: a v4-32 TPU VM, and a v5e-16 queued resource; both spot.
EXAMPLES = {
    "v4-32": dict(
        flags=["--accelerator-type=v4-32", "--spot"],
        accel="v4-32",
        version="tpu-ubuntu2204-base",
        queued=False,
    ),
    "v5e-16": dict(
        flags=["--accelerator-type=v5e-16", "--spot", "--queued"],
        accel="v5litepod-16",
        version="v2-alpha-tpuv5-lite",
        queued=True,
    ),
}


def dry(argv, env=None):
    """Runs the CLI in dry-run mode; returns (exit code, printed command argvs, raw text)."""
    out = io.StringIO()
    argv = list(argv)
    i = argv.index("--") if "--" in argv else len(argv)
    rc = tpu.main(argv[:i] + ["--dry-run"] + argv[i:], env=env or {}, out=out)
    text = out.getvalue()
    cmds = [shlex.split(ln) for ln in text.splitlines() if ln and not ln.startswith("#")]
    return rc, cmds, text


def remote(argv):
    """The --command=... script of a gcloud ssh argv."""
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command=") :]


def assert_loc(argv):
    assert "--zone=us-central2-b" in argv and "--project=my-proj" in argv


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "value,canonical,hosts,version",
    [
        ("v4-8", "v4-8", 1, "tpu-ubuntu2204-base"),
        ("v4-32", "v4-32", 4, "tpu-ubuntu2204-base"),
        ("v3-32", "v3-32", 4, "tpu-ubuntu2204-base"),
        ("v5p-64", "v5p-64", 8, "v2-alpha-tpuv5"),
        ("v5e-16", "v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
        ("v5litepod-8", "v5litepod-8", 1, "v2-alpha-tpuv5-lite"),
        ("v6e-8", "v6e-8", 1, "v2-alpha-tpuv6e"),
        ("v6e-256", "v6e-256", 64, "v2-alpha-tpuv6e"),
    ],
)
def test_accelerator_types(value, canonical, hosts, version):
    assert tpu.canonical_accelerator_type(value) == canonical
    assert tpu.num_hosts(value) == hosts
    assert tpu.default_runtime_version(value) == version


@pytest.mark.parametrize(
    "bad", ["v4", "v4-12", "v4-0", "v5e-3", "v6e-12", "v7-8", "tpu-v4-32", "V4-32", "v4-32 ", ""]
)
def test_bad_accelerator_types_refused(bad):
    with pytest.raises(tpu.SettingError, match="bad accelerator type"):
        tpu.parse_accelerator_type(bad)
    rc, cmds, _ = dry(["create", *BASE, f"--accelerator-type={bad}"]) if bad else (2, [], "")
    assert rc == 2 and cmds == []


# --------------------------------------------------------------------------- dry runs


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_dry_run_create(example):
    ex = EXAMPLES[example]
    rc, cmds, _ = dry(["create", *BASE, *ex["flags"]])
    assert rc == 0 and len(cmds) == 1
    (argv,) = cmds
    assert_loc(argv)
    assert f"--accelerator-type={ex['accel']}" in argv
    assert "--spot" in argv and "--preemptible" not in argv
    if ex["queued"]:
        assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "mae-pod-qr"]
        assert "--node-id=mae-pod" in argv
        assert f"--runtime-version={ex['version']}" in argv
    else:
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mae-pod"]
        assert f"--version={ex['version']}" in argv


def test_dry_run_create_options():
    rc, (argv,), _ = dry(
        [
            "create",
            *BASE,
            "--accelerator-type=v4-8",
            "--preemptible",
            "--internal-ip",
            "--runtime-version=tpu-ubuntu2204-base",
            "--service-account=sa@my-proj.iam.gserviceaccount.com",
            "--create-arg=--network=my-net",
        ]
    )
    assert rc == 0
    assert "--preemptible" in argv and "--spot" not in argv and "--internal-ips" in argv
    assert "--service-account=sa@my-proj.iam.gserviceaccount.com" in argv
    assert argv[-1] == "--network=my-net"
    rc, (argv,), _ = dry(["create", *BASE, "--accelerator-type=v6e-8", "--reserved"])
    assert "--reserved" in argv and "--version=v2-alpha-tpuv6e" in argv
    assert not any(a in argv for a in ("--spot", "--preemptible", "--internal-ips"))


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_dry_run_install_from_git(example):
    ex = EXAMPLES[example]
    rc, cmds, _ = dry(
        ["install", *BASE, *GIT, "--jax-version=0.10.2"] + (["--queued"] if ex["queued"] else [])
    )
    assert rc == 0 and len(cmds) == 1
    (argv,) = cmds
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mae-pod"]
    assert "--worker=all" in argv
    assert_loc(argv)
    script = remote(argv)
    assert "git clone --quiet https://github.com/example/mae-jax.git" in script
    assert "0123abcd" in script
    assert "'jax[tpu]==0.10.2'" in script
    assert "uv venv --python 3.11" in script
    assert "import jax, mae_jax" in script


def test_dry_run_install_from_wheel(tmp_path):
    wheel = tmp_path / "mae_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    configs = tmp_path / "configs"
    configs.mkdir()
    rc, cmds, _ = dry(["install", *BASE, f"--wheel={wheel}", f"--configs-dir={configs}"])
    assert rc == 0 and len(cmds) == 4
    mkdir, scp_wheel, scp_configs, ssh_install = cmds
    assert "mkdir -p" in remote(mkdir)
    assert scp_wheel[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp_wheel[5:7] == [str(wheel), "mae-pod:mae-jax/dist/"]
    assert "--worker=all" in scp_wheel and "--recurse" not in scp_wheel
    assert scp_configs[5:7] == [str(configs), "mae-pod:mae-jax/"]
    assert "--worker=all" in scp_configs and "--recurse" in scp_configs
    assert_loc(scp_wheel)
    assert "--worker=all" in ssh_install
    assert '"$HOME"/mae-jax/dist/mae_jax-0.1.0-py3-none-any.whl' in remote(ssh_install)
    assert "git clone" not in remote(ssh_install)
    # a missing wheel file, or wheel and git together, are refused
    assert dry(["install", *BASE, f"--wheel={tmp_path / 'nope.whl'}"])[0] == 2
    assert dry(["install", *BASE, f"--wheel={wheel}", *GIT])[0] == 2


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_dry_run_run(example):
    ex = EXAMPLES[example]
    rc, cmds, _ = dry(
        [
            "run",
            *BASE,
            f"--accelerator-type={ex['accel']}",
            "--bucket=my-bucket",
            "--",
            "--config.epochs=800",
            "--config.data.data_dir=gs://my-bucket/tfds",
        ]
    )
    assert rc == 0 and len(cmds) == 1
    (argv,) = cmds
    assert "--worker=all" in argv and argv[4] == "ssh"
    assert_loc(argv)
    script = remote(argv)
    # the training command, nested in the detached `sh -c`, with the gs:// workdir
    inner = shlex.split(script.split("setsid nohup sh -c ", 1)[1])[0]
    assert shlex.split(inner.split(";")[0])[1:] == [
        "-m",
        "mae_jax.main",
        "--config=configs/mae_vit_large.py",
        "--workdir=gs://my-bucket/mae-jax/mae_vit_large",
        "--config.epochs=800",
        "--config.data.data_dir=gs://my-bucket/tfds",
    ]
    assert "nohup" in script and "< /dev/null &" in script
    assert 'LOG="$HOME"/mae-logs/mae_vit_large.$(hostname).log' in script  # per worker


def test_dry_run_run_workdir_and_names():
    rc, (argv,), _ = dry(
        [
            "run",
            *BASE,
            "--accelerator-type=v4-32",
            "--workdir=gs://other/runs/vitl",
            "--config=configs/mae_vit_huge.py",
            "--run-name=vith-800ep",
            "--env=TFDS_DATA_DIR=gs://other/tfds",
        ]
    )
    assert rc == 0
    script = remote(argv)
    assert "--workdir=gs://other/runs/vitl" in script
    assert "--config=configs/mae_vit_huge.py" in script
    assert "mae-logs/vith-800ep.$(hostname).log" in script
    assert "export TFDS_DATA_DIR=gs://other/tfds" in script
    # a single-host slice may use a local workdir
    rc, (argv,), _ = dry(["run", *BASE, "--accelerator-type=v4-8", "--workdir=/tmp/mae"])
    assert rc == 0 and "--workdir=/tmp/mae" in remote(argv)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_dry_run_logs_stop_delete(example):
    ex = EXAMPLES[example]
    q = ["--queued"] if ex["queued"] else []
    rc, (logs,), _ = dry(["logs", *BASE, *q, "--worker=2"])
    assert rc == 0 and "--worker=2" in logs and logs[4] == "ssh"
    assert remote(logs) == 'tail -n 100 -F "$HOME"/mae-logs/mae_vit_large.$(hostname).log'
    rc, (stop,), _ = dry(["stop", *BASE, *q, "--grace=30"])
    assert rc == 0 and "--worker=all" in stop
    assert 'kill -TERM -"$P"' in remote(stop) and "-lt 30" in remote(stop)
    rc, (delete,), _ = dry(["delete", *BASE, *q])
    assert rc == 0
    assert_loc(delete)
    if ex["queued"]:
        assert delete[:6] == [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            "mae-pod-qr",
        ]
        assert "--force" in delete and "--quiet" in delete
    else:
        assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "mae-pod"]
        assert "--quiet" in delete


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_dry_run_supervise(example):
    ex = EXAMPLES[example]
    rc, cmds, text = dry(
        [
            "supervise",
            *BASE,
            *ex["flags"],
            *GIT,
            "--bucket=gs://my-bucket",
            "--max-restarts=5",
            "--",
            "--config.epochs=800",
        ]
    )
    assert rc == 0
    describe, status, delete, create, install, run = cmds
    group = "queued-resources" if ex["queued"] else "tpu-vm"
    assert describe[3:5] == [group, "describe"]
    assert ("--format=value(state.state)" if ex["queued"] else "--format=value(state)") in describe
    assert status[4] == "ssh" and "--worker=0" in status and "echo RUNNING" in remote(status)
    assert delete[3:5] == [group, "delete"]
    assert create[3:5] == [group, "create"]
    assert f"--accelerator-type={ex['accel']}" in create and "--spot" in create
    assert "--worker=all" in install and "git clone" in remote(install)
    assert "--worker=all" in run
    assert "--workdir=gs://my-bucket/mae-jax/mae_vit_large --config.epochs=800" in remote(run)
    for argv in cmds:
        assert_loc(argv)
    assert "at most 5 restarts" in text


def test_env_vars_provide_settings():
    env = {
        "MAE_TPU_PROJECT": "env-proj",
        "MAE_TPU_ZONE": "europe-west4-a",
        "MAE_TPU_NAME": "env-tpu",
        "MAE_TPU_TYPE": "v5p-64",
        "MAE_BUCKET": "env-bucket",
        "MAE_GIT_URL": "https://example.com/mae.git",
    }
    rc, (argv,), _ = dry(["create"], env=env)
    assert rc == 0
    assert argv[5] == "env-tpu" and "--project=env-proj" in argv
    assert "--zone=europe-west4-a" in argv and "--accelerator-type=v5p-64" in argv
    rc, (argv,), _ = dry(["run"], env=env)
    assert rc == 0 and "--workdir=gs://env-bucket/mae-jax/mae_vit_large" in remote(argv)
    rc, (argv,), _ = dry(["install"], env=env)
    assert rc == 0 and "https://example.com/mae.git" in remote(argv)
    # flags win over the environment
    rc, (argv,), _ = dry(["create", "--project=flag-proj"], env=env)
    assert "--project=flag-proj" in argv


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "argv,missing,how",
    [
        (
            ["create", "--zone=us-central2-b", "--accelerator-type=v4-32"],
            "project",
            "MAE_TPU_PROJECT",
        ),
        (["create", "--project=my-proj", "--accelerator-type=v4-32"], "zone", "MAE_TPU_ZONE"),
        (
            ["create", "--project=my-proj", "--zone=us-central2-b"],
            "accelerator_type",
            "MAE_TPU_TYPE",
        ),
        (
            ["run", "--project=my-proj", "--zone=us-central2-b", "--accelerator-type=v4-32"],
            "bucket",
            "MAE_BUCKET",
        ),
        (
            ["run", "--project=my-proj", "--zone=us-central2-b", "--bucket=b-1"],
            "accelerator_type",
            "MAE_TPU_TYPE",
        ),
        (["install", "--project=my-proj", "--zone=us-central2-b"], "git_url", "MAE_GIT_URL"),
        (["supervise", *BASE, "--accelerator-type=v5e-16", *GIT], "bucket", "MAE_BUCKET"),
        (["delete", "--zone=us-central2-b"], "project", "MAE_TPU_PROJECT"),
        (["logs", "--project=my-proj"], "zone", "MAE_TPU_ZONE"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_settings_refused(argv, missing, how, dry_run, capsys):
    class Forbidden:
        def run(self, argv):
            raise AssertionError(f"ran {argv}")

    out = io.StringIO()
    rc = tpu.main(argv + (["--dry-run"] if dry_run else []), env={}, out=out, runner=Forbidden())
    assert rc == 2 and out.getvalue() == ""
    err = capsys.readouterr().err
    assert f"missing setting '{missing}'" in err and how in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", *BASE, "--accelerator-type=v4-32", "--workdir=/home/me/run"], "is not on gs://"),
        (["run", *BASE, "--accelerator-type=v5e-16", "--workdir=runs/x"], "4 hosts"),
        (["create", *BASE, "--accelerator-type=v4-32", "--spot", "--preemptible"], "exclude"),
        (["create", *BASE, "--accelerator-type=v4-32", "--queued", "--preemptible"], "--spot"),
        (
            ["create", "--project=my-proj", "--zone=uscentral", "--accelerator-type=v4-8"],
            "bad zone",
        ),
        (["create", *BASE[:2], "--name=Bad_Name", "--accelerator-type=v4-8"], "bad TPU name"),
        (["install", *BASE, *GIT, "--python-version=3.10"], "3.11 or newer"),
        (
            ["run", *BASE, "--accelerator-type=v4-8", "--bucket=gs://my-bucket", "--env=NOEQUALS"],
            "--env",
        ),
        (["logs", *BASE, "--", "--config.x=1"], "run/supervise"),
        (
            ["supervise", *BASE, "--accelerator-type=v4-8", "--spot", *GIT, "--workdir=/tmp/run"],
            "checkpoints must live in Cloud Storage",
        ),
    ],
)
def test_bad_settings_refused(argv, message, capsys):
    rc, cmds, _ = dry(argv)
    assert rc == 2 and cmds == []
    assert message in capsys.readouterr().err


def test_dry_run_flag_after_separator_refused(capsys):
    class Forbidden:
        def run(self, argv):
            raise AssertionError(f"ran {argv}")

    rc = tpu.main(
        ["run", *BASE, "--accelerator-type=v4-8", "--bucket=my-bucket", "--", "--dry-run"],
        env={},
        runner=Forbidden(),
        out=io.StringIO(),
    )
    assert rc == 2 and "put it before `--`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--config.num_epochs=800", "unknown config key 'num_epochs'; did you mean 'epochs'?"),
        ("--config.batch_size=lots", "config.batch_size must be an int, got 'lots'"),
        ("--config.model.nmae=x", "unknown config key 'model.nmae'"),
    ],
)
def test_training_flags_are_checked_before_anything_runs(flag, message, capsys):
    class Forbidden:
        def run(self, argv):
            raise AssertionError(f"ran {argv}")

    rc = tpu.main(
        ["run", *BASE, "--accelerator-type=v4-8", "--bucket=my-bucket", "--", flag],
        env={},
        runner=Forbidden(),
        out=io.StringIO(),
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"error: training flags: {message}" in err, err


# --------------------------------------------------------------------------- supervise


class FakeCloud:
    """Scripted gcloud: describe returns the next state; the worker-0 status check returns
    what the simulated training process is doing; everything else succeeds and is logged."""

    def __init__(self, states, statuses, create_rcs=()):
        self.states, self.statuses = list(states), list(statuses)
        self.create_rcs = list(create_rcs)
        self.calls = []

    def kind(self, argv):
        if "describe" in argv:
            return "describe"
        if "create" in argv:
            return "create"
        if "delete" in argv:
            return "delete"
        if "scp" in argv:
            return "scp"
        script = remote(argv)
        if "echo RUNNING" in script:
            return "status"
        if "uv pip install" in script:
            return "install"
        if "setsid nohup" in script:
            return "run"
        return "ssh"

    def run(self, argv):
        k = self.kind(argv)
        self.calls.append((k, list(argv)))
        if k == "describe":
            state = self.states.pop(0)
            if state == "MISSING":
                return 1, (
                    "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: "
                    "Resource 'projects/p/locations/z/nodes/mae-pod' was not found\n"
                )
            if state == "API_ERROR":
                return 1, "ERROR: (gcloud) There was a problem refreshing your credentials.\n"
            return 0, state + "\n"
        if k == "status":
            return 0, self.statuses.pop(0) + "\n"
        if k == "create" and self.create_rcs:
            return self.create_rcs.pop(0), ""
        return 0, ""

    def kinds(self):
        return [k for k, _ in self.calls]


def make_supervisor(cloud, queued=False, max_restarts=3, skip_first_install=False):
    s = tpu.Slice("my-proj", "us-central2-b", "mae-pod", queued=queued, qr_name="mae-pod-qr")
    accel = "v5litepod-16" if queued else "v4-32"
    c = tpu.CreateSpec(accel, tpu.default_runtime_version(accel), spot=True)
    i = tpu.InstallSpec(git_url="https://github.com/example/mae-jax.git", git_rev="0123abcd")
    r = tpu.RunSpec(
        "vitl", "configs/mae_vit_large.py", "gs://my-bucket/vitl", ("--config.epochs=800",)
    )
    sleeps = []
    logs = []
    sup = tpu.Supervisor(
        s,
        c,
        i,
        r,
        cloud,
        max_restarts=max_restarts,
        poll_s=30,
        sleep=sleeps.append,
        log=logs.append,
        skip_first_install=skip_first_install,
    )
    return sup, sleeps, logs


def test_supervise_healthy_preempted_recreated_restarted():
    cloud = FakeCloud(
        states=["READY", "READY", "PREEMPTED", "CREATING", "READY", "READY", "READY"],
        statuses=["NOT_STARTED", "RUNNING", "NOT_STARTED", "RUNNING", "EXITED 0"],
    )
    sup, sleeps, logs = make_supervisor(cloud)
    assert sup.loop() == 0
    assert cloud.kinds() == [
        "describe",
        "status",
        "install",
        "run",  # first start
        "describe",
        "status",  # healthy, running
        "describe",
        "delete",
        "create",  # preempted: recreate
        "describe",  # CREATING: wait
        "describe",
        "status",
        "install",
        "run",  # READY: reinstall, restart
        "describe",
        "status",  # running again
        "describe",
        "status",  # exited 0: done
    ]
    assert sup.restarts == 1
    runs = [argv for k, argv in cloud.calls if k == "run"]
    assert runs[0] == runs[1]  # the same command: it resumes from the workdir's checkpoint
    assert "--worker=all" in runs[0]
    assert "--workdir=gs://my-bucket/vitl --config.epochs=800" in remote(runs[0])
    delete = next(argv for k, argv in cloud.calls if k == "delete")
    create = next(argv for k, argv in cloud.calls if k == "create")
    assert delete[3:6] == ["tpu-vm", "delete", "mae-pod"]
    assert create[3:6] == ["tpu-vm", "create", "mae-pod"] and "--spot" in create
    assert sleeps == [30] * 6
    assert any("training finished" in m for m in logs)


def test_supervise_max_restarts_reached():
    cloud = FakeCloud(
        states=["READY", "PREEMPTED", "READY", "PREEMPTED", "READY", "PREEMPTED"],
        statuses=["NOT_STARTED", "NOT_STARTED", "NOT_STARTED"],
    )
    sup, _, logs = make_supervisor(cloud, max_restarts=2)
    assert sup.loop() == 1
    assert sup.restarts == 2
    assert cloud.kinds().count("run") == 3  # first start + 2 restarts
    assert cloud.kinds().count("create") == 2  # nothing recreated after the limit
    assert cloud.kinds()[-1] == "describe"
    assert "max restarts (2) reached" in logs[-1]


def test_supervise_zero_restarts_gives_up_at_first_preemption():
    cloud = FakeCloud(states=["READY", "READY", "PREEMPTED"], statuses=["NOT_STARTED", "RUNNING"])
    sup, _, _ = make_supervisor(cloud, max_restarts=0)
    assert sup.loop() == 1
    assert "create" not in cloud.kinds() and "delete" not in cloud.kinds()


def test_supervise_queued_resource_suspended():
    cloud = FakeCloud(
        states=["ACTIVE", "SUSPENDED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "ACTIVE"],
        statuses=["RUNNING", "NOT_STARTED", "EXITED 0"],
    )
    sup, _, _ = make_supervisor(cloud, queued=True)
    assert sup.loop() == 0
    assert cloud.kinds() == [
        "describe",
        "status",
        "describe",
        "delete",
        "create",
        "describe",
        "describe",
        "describe",
        "status",
        "install",
        "run",
        "describe",
        "status",
    ]
    assert sup.restarts == 1  # the run was found running, so the relaunch is a restart
    describe = cloud.calls[0][1]
    assert describe[3:6] == ["queued-resources", "describe", "mae-pod-qr"]
    delete = next(argv for k, argv in cloud.calls if k == "delete")
    assert delete[3:6] == ["queued-resources", "delete", "mae-pod-qr"] and "--force" in delete
    create = next(argv for k, argv in cloud.calls if k == "create")
    assert "--node-id=mae-pod" in create and "--accelerator-type=v5litepod-16" in create


def test_supervise_creates_missing_slice_and_retries_failed_create():
    cloud = FakeCloud(
        states=["MISSING", "MISSING", "READY", "READY"],
        statuses=["NOT_STARTED", "EXITED 0"],
        create_rcs=[1, 0],
    )
    sup, _, _ = make_supervisor(cloud, max_restarts=0, skip_first_install=True)
    assert sup.loop() == 0
    # missing: no delete; the failed create is retried; a created slice always gets installed
    assert cloud.kinds() == [
        "describe",
        "create",
        "describe",
        "create",
        "describe",
        "status",
        "install",
        "run",
        "describe",
        "status",
    ]
    assert sup.restarts == 0


def test_supervise_skip_first_install_on_existing_slice():
    cloud = FakeCloud(
        states=["READY", "PREEMPTED", "READY", "READY"],
        statuses=["NOT_STARTED", "NOT_STARTED", "EXITED 0"],
    )
    sup, _, _ = make_supervisor(cloud, skip_first_install=True)
    assert sup.loop() == 0
    kinds = cloud.kinds()
    assert kinds[:3] == ["describe", "status", "run"]  # first start: no install
    assert kinds[-5:-2] == ["status", "install", "run"]  # after recreation: install


def test_supervise_never_deletes_on_api_errors():
    cloud = FakeCloud(
        states=["API_ERROR", "UNKNOWN_STATE", "REPAIRING", "READY"], statuses=["EXITED 0"]
    )
    sup, _, _ = make_supervisor(cloud)
    sup.max_polls = 4
    assert sup.loop() == 0
    assert "delete" not in cloud.kinds() and "create" not in cloud.kinds()


def test_supervise_crash_on_healthy_slice_stops():
    cloud = FakeCloud(
        states=["READY"] * 4, statuses=["NOT_STARTED", "RUNNING", "EXITED 1", "EXITED 1"]
    )
    sup, _, logs = make_supervisor(cloud)
    assert sup.loop() == 1
    assert cloud.kinds().count("run") == 1
    assert "crashed" in logs[-1]


def test_supervise_external_stop_ends_supervision():
    cloud = FakeCloud(states=["READY"] * 3, statuses=["NOT_STARTED", "RUNNING", "NOT_STARTED"])
    sup, _, _ = make_supervisor(cloud)
    assert sup.loop() == 0
    assert cloud.kinds().count("run") == 1


def test_supervise_cli_with_injected_runner():
    cloud = FakeCloud(
        states=["READY", "PREEMPTED", "READY", "READY"],
        statuses=["NOT_STARTED", "NOT_STARTED", "EXITED 0"],
    )
    sleeps = []
    rc = tpu.main(
        [
            "supervise",
            *BASE,
            "--accelerator-type=v4-32",
            "--spot",
            *GIT,
            "--bucket=my-bucket",
            "--max-restarts=1",
            "--poll-interval=5",
        ],
        env={},
        runner=cloud,
        sleep=sleeps.append,
        out=io.StringIO(),
    )
    assert rc == 0
    assert cloud.kinds().count("run") == 2 and sleeps == [5, 5, 5]


@pytest.mark.parametrize(
    "rc,out,state",
    [
        (0, "READY\n", "READY"),
        (0, "WARNING: something\nPREEMPTED\n", "PREEMPTED"),
        (0, "", "UNKNOWN"),
        (1, "ERROR: NOT_FOUND: Resource 'x' was not found", "MISSING"),
        (1, "ERROR: permission denied", "UNKNOWN"),
    ],
)
def test_parse_state(rc, out, state):
    assert tpu.parse_state(rc, out) == state


def test_parse_status():
    assert tpu.parse_status(0, "RUNNING\n") == "RUNNING"
    assert tpu.parse_status(0, "Warning: Permanently added\nEXITED 3\n") == "EXITED 3"
    assert tpu.parse_status(255, "ssh: connect to host") is None
    assert tpu.parse_status(0, "garbage") is None


# --------------------------------------------------------------------------- remote scripts


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_remote_scripts_parse(shell, tmp_path):
    wheel = tmp_path / "mae_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    configs = tmp_path / "configs"
    configs.mkdir()
    cmds = []
    for argv in (
        ["install", *BASE, *GIT],
        ["install", *BASE, f"--wheel={wheel}", f"--configs-dir={configs}"],
        [
            "run",
            *BASE,
            "--accelerator-type=v4-32",
            "--bucket=my-bucket",
            "--",
            "--config.data.name=it's quoted",
        ],
        ["stop", *BASE],
        ["logs", *BASE],
        ["status", *BASE],
    ):
        rc, c, _ = dry(argv)
        assert rc == 0
        cmds += [a for a in c if a[4] == "ssh"]
    for argv in cmds:
        p = subprocess.run([shell, "-n", "-c", remote(argv)], capture_output=True, text=True)
        assert p.returncode == 0, (remote(argv), p.stderr)


def _sh(script, home):
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    return p.returncode, p.stdout + p.stderr


def _wait_for(fn, timeout=20.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if fn():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid")
def test_remote_run_status_stop_for_real(tmp_path):
    """The run script detaches the training process, logs per host, records pid and exit
    code; status reports it; stop kills the whole process group."""
    home = tmp_path / "home"
    (home / "mae-jax" / "configs").mkdir(parents=True)
    venv_bin = home / "mae-venv" / "bin"
    venv_bin.mkdir(parents=True)
    fake = venv_bin / "python"
    # A fake interpreter: logs its arguments, then sleeps (or exits with $FAKE_EXIT).
    fake.write_text(
        '#!/bin/sh\necho "args: $*"\necho "cwd: $(pwd)"\n'
        'if [ -n "$FAKE_EXIT" ]; then exit "$FAKE_EXIT"; fi\nexec sleep 300\n'
    )
    fake.chmod(0o755)
    r = tpu.RunSpec("vitl", "configs/mae_vit_large.py", "gs://b/vitl", ("--config.x=it's",))
    log = home / "mae-logs" / f"vitl.{subprocess.check_output(['hostname'], text=True).strip()}.log"

    rc, out = _sh(tpu.run_script(r), home)
    assert rc == 0 and "started vitl" in out
    assert _wait_for(lambda: log.exists() and "cwd:" in log.read_text())
    text = log.read_text()
    assert (
        "args: -m mae_jax.main --config=configs/mae_vit_large.py --workdir=gs://b/vitl "
        "--config.x=it's"
    ) in text
    assert f"cwd: {home / 'mae-jax'}" in text
    assert _sh(tpu.status_script(r), home) == (0, "RUNNING\n")
    rc, out = _sh(tpu.run_script(r), home)  # a second start is refused
    assert rc == 1 and "already running" in out
    pid = int((home / "mae-logs" / "vitl.pid").read_text())

    rc, out = _sh(tpu.stop_script(r, grace_s=10), home)
    assert rc == 0 and "stopped vitl" in out
    assert _wait_for(
        lambda: (
            not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        )
    )
    assert _sh(tpu.status_script(r), home) == (0, "NOT_STARTED\n")

    # a run that ends on its own leaves its exit code for the supervisor
    r2 = tpu.RunSpec("crash", "configs/mae_vit_large.py", "gs://b/crash", env=("FAKE_EXIT=3",))
    rc, out = _sh(tpu.run_script(r2), home)
    assert rc == 0
    assert _wait_for(lambda: _sh(tpu.status_script(r2), home)[1] == "EXITED 3\n")
    r3 = tpu.RunSpec("done", "configs/mae_vit_large.py", "gs://b/done", env=("FAKE_EXIT=0",))
    _sh(tpu.run_script(r3), home)
    assert _wait_for(lambda: _sh(tpu.status_script(r3), home)[1] == "EXITED 0\n")


# --------------------------------------------------------------------------- entry points


def test_cli_from_repo_root():
    argv = [
        sys.executable,
        "launch/tpu.py",
        "create",
        *BASE,
        "--accelerator-type=v5e-16",
        "--spot",
        "--dry-run",
    ]
    p = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MAE_TPU_PROJECT": ""}
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == (
        "gcloud compute tpus tpu-vm create mae-pod --zone=us-central2-b "
        "--project=my-proj --accelerator-type=v5litepod-16 "
        "--version=v2-alpha-tpuv5-lite --spot\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAE_")}
    p = subprocess.run(
        [sys.executable, "launch/tpu.py", "delete", "--zone=us-central2-b", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert "missing setting 'project'" in p.stderr


def test_slurm_example():
    path = os.path.join(ROOT, "launch", "slurm_example.sbatch")
    p = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = open(path).read()
    assert "#SBATCH --ntasks-per-node=1" in text
    for flag in (
        "python -m mae_jax.main",
        "--coordinator_address=",
        "--num_processes=",
        "--process_id=",
        "$SLURM_PROCID",
        "srun",
    ):
        assert flag in text


def test_real_mode_runs_gcloud(tmp_path):
    """Without --dry-run the same argv reaches gcloud (here a fake one on PATH that records
    its arguments); a failing command's exit code is returned."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "calls.txt"
    fake = bindir / "gcloud"
    fake.write_text(
        '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> "$RECORD"\n'
        'echo "--" >> "$RECORD"\n'
        'case "$*" in *describe*) echo READY;; *delete*) echo "boom" >&2; '
        "exit 7;; esac\n"
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAE_")}
    env.update(PATH=f"{bindir}:{env['PATH']}", RECORD=str(record))

    def cli(*argv):
        return subprocess.run(
            [sys.executable, "launch/tpu.py", *argv, *BASE],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
        )

    p = cli("create", "--accelerator-type=v4-32", "--spot")
    assert p.returncode == 0, p.stderr
    _, expected, _ = dry(["create", *BASE, "--accelerator-type=v4-32", "--spot"])
    calls = [c.strip("\n").split("\n") for c in record.read_text().split("--\n") if c]
    assert [["gcloud"] + c for c in calls] == expected
    p = cli("status")
    assert p.returncode == 0 and "READY" in p.stdout
    p = cli("delete")
    assert p.returncode == 7 and "boom" in p.stdout
