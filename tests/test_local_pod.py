"""launch/local_pod.py: dry run, failure propagation, signal forwarding, and (slow) a real
2-process x 4-device training run that is killed, resumes, and matches one 8-device process."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from config_files import load_config, override

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_pod.py")
sys.path.insert(0, os.path.join(REPO, "launch"))
import local_pod  # noqa: E402  pylint: disable=g-import-not-at-top

# A small real run: a 2-block model on 32x32 images, 4 steps (warm-up 2), a checkpoint every 2
# steps, and parameters FSDP-sharded over all 8 devices, i.e. across the 2 processes
# (cross-process all-gathers in the step, Orbax saving shards of both processes). The first
# launch is killed after checkpoint 2; the resumed launch does steps 3-4 and, at its last step,
# the reconstruction grid (the parameters gathered to process 0) and the kNN monitor (each
# process reads its strided half of the first 64 train / 40 eval examples; features are
# gathered to both). Reconstruction and kNN run once, at the end: a period of 4 in a 4-step run
# (the first launch compiled and ran them too when they came every 4 steps of 8, and process 1,
# which never writes the compilation cache, compiles every program again at each launch).
SETTINGS = {
    "model.name": "mae_vit_test",
    "batch_size": 16,
    "total_steps": 4,
    "warmup_steps": 2,
    "checkpoint_every_steps": 2,
    "log_every_steps": 1,
    "reconstruction_every_steps": 4,
    "mesh.data": 1,
    "mesh.fsdp": 8,
    "knn_every_steps": 4,
    "knn_bank_size": 64,
    "knn_num_queries": 40,
}
OVERRIDES = [f"--config.{k}={v}" for k, v in SETTINGS.items()]
RUN_TIMEOUT = 480


def _launcher_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the launcher sets the device count itself
    env.update(extra)
    return env


def _launch(args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, LAUNCHER, *args],
        cwd=REPO,
        env=env or _launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


# ------------------------------------------------------------------------------- dry run
def test_dry_run_prints_the_exact_commands(tmp_path):
    wd = tmp_path / "wd"
    out = subprocess.run(
        [
            sys.executable,
            LAUNCHER,
            "--num-processes=3",
            "--devices-per-process=2",
            "--config=configs/smoke.py",
            f"--workdir={wd}",
            "--port=12345",
            "--dry-run",
            "--",
            "--config.total_steps=5",
            "--config.batch_size=12",
        ],
        cwd=REPO,
        env=_launcher_env(XLA_FLAGS="--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        k = argv.index(sys.executable)
        env = dict(a.split("=", 1) for a in argv[1:k])
        assert argv[0] == "env"
        assert env["JAX_PLATFORMS"] == "cpu"
        # An inherited device count is replaced, other XLA flags are kept.
        assert env["XLA_FLAGS"] == ("--xla_cpu_foo=1 --xla_force_host_platform_device_count=2")
        assert env["PYTHONPATH"].split(os.pathsep)[0] == REPO
        assert argv[k:] == [
            sys.executable,
            "-m",
            "mae_jax.main",
            "--config=configs/smoke.py",
            f"--workdir={wd}",
            "--coordinator_address=127.0.0.1:12345",
            "--num_processes=3",
            f"--process_id={i}",
            "--config.compilation_cache=none",  # see local_pod.train_command
            "--config.total_steps=5",
            "--config.batch_size=12",
        ]
    assert not wd.exists()  # a dry run starts nothing, writes nothing


def test_dry_run_picks_a_free_port_and_rejects_bad_settings(tmp_path):
    out = subprocess.run(
        [sys.executable, LAUNCHER, f"--workdir={tmp_path}", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ports = set(re.findall(r"--coordinator_address=127\.0\.0\.1:(\d+)", out))
    assert len(ports) == 1 and 0 < int(ports.pop()) < 65536
    assert out.count("--num_processes=2") == 2  # default 2 processes x 4 devices
    assert "--xla_force_host_platform_device_count=4" in out
    for bad, word in [
        ("--num-processes=0", "--num-processes"),
        ("--devices-per-process=0", "--devices-per-process"),
        ("--port=70000", "--port"),
    ]:
        r = subprocess.run(
            [sys.executable, LAUNCHER, f"--workdir={tmp_path}", bad, "--dry-run"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and word in r.stderr, (bad, r.stderr)


def test_process_env_and_command():
    env = local_pod.process_env(
        3, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=9", "PYTHONPATH": "/x"}
    )
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    assert env["PYTHONPATH"] == os.pathsep.join([REPO, "/x"])
    cmd = local_pod.train_command("py", "c.py", "/w", 7, 2, 1, ["--a=1"])
    assert cmd == [
        "py",
        "-m",
        "mae_jax.main",
        "--config=c.py",
        "--workdir=/w",
        "--coordinator_address=127.0.0.1:7",
        "--num_processes=2",
        "--process_id=1",
        "--config.compilation_cache=none",  # EXTRA comes after it: a user's setting wins
        "--a=1",
    ]


# ------------------------------------------------------------------------------- failures
_FAKE_MAIN = """
import signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
i, workdir = int(args["process_id"]), args["workdir"]
mode = args.get("mode", "")
def on_term(signum, frame):
    open(f"{workdir}/term_{i}", "w").write(str(signum))
    sys.exit(0 if mode == "clean" else 7)
signal.signal(signal.SIGTERM, on_term)
print(f"fake process {i} of {args['num_processes']} up", flush=True)
if mode == "fail" and i == 1:
    time.sleep(0.5)
    print("ValueError: process 1 broke on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(120)
"""


@pytest.fixture
def fake_module(tmp_path):
    d = tmp_path / "mod"
    d.mkdir()
    (d / "fake_main.py").write_text(textwrap.dedent(_FAKE_MAIN))
    return _launcher_env(PYTHONPATH=str(d))


def test_a_failing_process_stops_the_others(tmp_path, fake_module):
    wd = tmp_path / "wd"
    t0 = time.monotonic()
    p = _launch(
        [
            "--module=fake_main",
            f"--workdir={wd}",
            "--num-processes=3",
            "--grace=20",
            "--",
            "--mode=fail",
        ],
        env=fake_module,
    )
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, (out, err)
    assert time.monotonic() - t0 < 30  # the sleeping processes were stopped, not waited for
    assert "process 1 exited with code 3" in out
    assert "ValueError: process 1 broke on purpose" in err  # the failing process's log tail
    assert "[p0] fake process 0 of 3 up" in out  # process 0 is streamed
    for i in (0, 2):  # the others got SIGTERM
        assert (wd / f"term_{i}").read_text() == str(int(signal.SIGTERM))
    for i in range(3):
        assert f"fake process {i} of 3 up" in (wd / "logs" / f"process_{i}.log").read_text()


def test_signals_are_forwarded(tmp_path, fake_module):
    wd = tmp_path / "wd"
    p = _launch(["--module=fake_main", f"--workdir={wd}", "--", "--mode=clean"], env=fake_module)
    deadline = time.monotonic() + 30
    logs = [wd / "logs" / f"process_{i}.log" for i in range(2)]
    while not all(f.exists() and "up" in f.read_text() for f in logs):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, (out, err)  # every process saved and exited cleanly
    for i in range(2):
        assert (wd / f"term_{i}").read_text() == str(int(signal.SIGTERM))
    assert "forwarding" in out


@pytest.mark.slow  # two real training processes
def test_bad_config_fails_the_real_command(tmp_path):
    """The real training command on 2 processes: a global batch that the 8 devices do not
    divide stops both, and the launcher shows the error and exits non-zero."""
    p = _launch(
        [
            f"--workdir={tmp_path}",
            "--grace=10",
            "--",
            "--config.model.name=mae_vit_test",
            "--config.batch_size=15",
        ]
    )
    out, err = p.communicate(timeout=180)
    assert p.returncode == 1, (out, err)
    assert "config.batch_size=15 is not divisible" in err
    assert "failed (exit code 1)" in err


# ------------------------------------------------------------------------------- end to end
def _pids(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"\[local_pod\] process \d+: pid (\d+)", text)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _steps(ckpt_dir) -> list[int]:
    return (
        sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
        if os.path.isdir(ckpt_dir)
        else []
    )


def _losses(workdir, key="loss") -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: float(r[key]) for r in records if key in r}


def _event_tags(workdir) -> set[str]:
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    tags = set()
    for name in os.listdir(workdir):
        if name.startswith("events.out.tfevents"):
            for rec in tf.data.TFRecordDataset(os.path.join(workdir, name)):
                tags.update(v.tag for v in event_pb2.Event.FromString(rec.numpy()).summary.value)
    return tags


def _reference_losses(workdir, monkeypatch) -> dict[int, float]:
    """One process, 8 devices, same config, `pretrain.train_and_evaluate` as main.py runs it; the
    data iterator yields the rows of the 2 processes' iterators, process 0's first, which is
    how the 2-process run assembles its global batch. Without the reconstruction grid and the
    checkpoint at step 2 (not compiled, not run): neither may change the losses or the kNN
    result, so a pod run whose grid or save did is caught by the comparison. On the default
    data-parallel mesh, not the pod's FSDP one: the same numbers (the layout changes no loss
    bit), a reference independent of the FSDP layout under test, and the init and train programs
    of `tiny_run` (same model and batch; the schedule is an argument), which the session's
    compilation cache holds once another test trained it: ~10 s of CPU less in a whole run."""
    from mae_jax.data import pipeline
    from mae_jax.tasks import pretrain

    no_grid_no_save = {"reconstruction_every_steps": 0, "checkpoint_every_steps": 0}
    data_parallel = {"mesh.data": -1, "mesh.fsdp": 1}
    config = override(load_config(), **{**SETTINGS, **no_grid_no_save, **data_parallel})

    real = pipeline.create_pretrain_iterator

    class TwoProcesses:
        def __init__(self, cfg, global_batch_size, seed, start_step):
            self.its = [
                real(
                    cfg,
                    global_batch_size=global_batch_size,
                    seed=seed,
                    start_step=start_step,
                    process_index=i,
                    process_count=2,
                )
                for i in range(2)
            ]

        position = property(lambda self: self.its[0].position)
        skipped = property(lambda self: sum(it.skipped for it in self.its))

        def __next__(self):
            return {"image": np.concatenate([next(it)["image"] for it in self.its])}

    monkeypatch.setattr(
        pipeline,
        "create_pretrain_iterator",
        lambda cfg, *, global_batch_size, seed, start_step, **_: TwoProcesses(
            cfg, global_batch_size, seed, start_step
        ),
    )
    import jax

    assert jax.process_count() == 1 and jax.device_count() == 8
    pretrain.train_and_evaluate(config, str(workdir))
    return _losses(workdir)


@pytest.mark.slow
def test_two_processes_train_checkpoint_get_killed_resume_and_match_one_process(
    tmp_path, monkeypatch
):
    wd = tmp_path / "pod"
    args = [
        f"--workdir={wd}",
        "--num-processes=2",
        "--devices-per-process=4",
        "--grace=10",
        "--",
        *OVERRIDES,
    ]
    ckpt_dir = wd / "checkpoints"

    # 1. Train until a checkpoint exists, then SIGKILL the launcher and every process.
    out_path = tmp_path / "launcher1.out"
    with open(out_path, "w") as out_file:
        p = subprocess.Popen(
            [sys.executable, LAUNCHER, *args],
            cwd=REPO,
            env=_launcher_env(),
            stdout=out_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while not _steps(ckpt_dir):
            assert p.poll() is None, out_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        finished_before_kill = p.poll() is not None
        pids = _pids(out_path.read_text())
        for pid in [*pids, p.pid]:
            os.kill(pid, signal.SIGKILL)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert len(pids) == 2, out_path.read_text()
    assert not finished_before_kill
    killed_at = _steps(ckpt_dir)
    assert killed_at and killed_at[-1] < 4, f"killed too late: checkpoints {killed_at}"
    t = time.monotonic()
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() - t < 30, "processes survived SIGKILL"
        time.sleep(0.1)

    # 2. The same command resumes from the last checkpoint and finishes.
    p = _launch(args)
    out, err = p.communicate(timeout=RUN_TIMEOUT)
    assert p.returncode == 0, (out[-3000:], err[-3000:])
    assert re.search(r"\[p0\] .*resumed from step (\d+)", out), out[-3000:]
    resumed = int(re.search(r"resumed from step (\d+)", out).group(1))
    assert resumed in killed_at
    assert _steps(ckpt_dir)[-1] == 4
    assert "reconstruction" in _event_tags(wd)
    log1 = (wd / "logs" / "process_1.log").read_text()
    assert log1.count("=== local_pod") == 2 and "process 1 of 2" in log1
    pod = _losses(wd)
    assert sorted(pod) == list(range(1, 5))

    # 3. One process with 8 devices on the same config and the same global batches.
    ref = _reference_losses(tmp_path / "ref", monkeypatch)
    assert sorted(ref) == list(range(1, 5))
    a = np.array([pod[s] for s in range(1, 5)])
    b = np.array([ref[s] for s in range(1, 5)])
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert a[-1] < a[0]  # it learns
    # The same kNN top-1: the same 64 + 40 examples (strided shards), the same features.
    pod_knn, ref_knn = _losses(wd, "knn_top1"), _losses(tmp_path / "ref", "knn_top1")
    assert sorted(pod_knn) == sorted(ref_knn) == [4]
    assert pod_knn == ref_knn, (pod_knn, ref_knn)
    assert "kNN monitor at step 4: top-1" in out and "bank 64, queries 40" in out
