#!/usr/bin/env python3
"""Cloud TPU VM launcher for mae-jax: create, install, run, logs, stop, delete, supervise.

Run from the repository root: ``python launch/tpu.py SUBCOMMAND [flags] [-- --config.x=y ...]``.
Standard library only: every action is a ``gcloud compute tpus ...`` command line. Each
subcommand takes ``--dry-run``, which prints the exact commands (one per line, shell-quoted)
and runs nothing. Settings come from flags or environment variables (see ``ENV``); a missing
required setting or a malformed value stops the script with exit code 2 before anything runs.

Layout on every TPU worker (paths relative to the login user's $HOME):
  mae-venv/                  Python venv (made with uv) holding jax[tpu] and mae-jax
  mae-jax/                   the source checkout (git mode) or configs/ + dist/ (wheel mode)
  mae-logs/RUN.HOST.log      the worker's training log; RUN.pid / RUN.exit: pid and exit code
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TextIO

# Setting name -> environment variable that can provide it.
ENV = {
    "project": "MAE_TPU_PROJECT",
    "zone": "MAE_TPU_ZONE",
    "name": "MAE_TPU_NAME",
    "accelerator_type": "MAE_TPU_TYPE",
    "runtime_version": "MAE_TPU_RUNTIME_VERSION",
    "bucket": "MAE_BUCKET",
    "git_url": "MAE_GIT_URL",
    "git_rev": "MAE_GIT_REV",
}
DEFAULT_NAME = "mae-tpu"
DEFAULT_CONFIG = "configs/mae_vit_large.py"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Generation -> (counted unit, default runtime version). Runtime versions per Cloud TPU's
# "TPU software versions" page: v4 and older use tpu-ubuntu2204-base.
GENERATIONS = {
    "v2": ("cores", "tpu-ubuntu2204-base"),
    "v3": ("cores", "tpu-ubuntu2204-base"),
    "v4": ("cores", "tpu-ubuntu2204-base"),
    "v5p": ("cores", "v2-alpha-tpuv5"),
    "v5litepod": ("chips", "v2-alpha-tpuv5-lite"),
    "v6e": ("chips", "v2-alpha-tpuv6e"),
}
ALIASES = {"v5e": "v5litepod"}
CHIP_COUNTS = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e / v6e slice sizes

# Slice states, from `describe --format=value(state)` (TPU VM) or `value(state.state)`
# (queued resource), grouped by what the supervisor does about them.
HEALTHY = {"READY", "ACTIVE"}
LOST = {
    "PREEMPTED",
    "TERMINATED",
    "STOPPED",
    "STOPPING",
    "FAILED",
    "SUSPENDING",
    "SUSPENDED",
    "MISSING",
}
MISSING = "MISSING"


class SettingError(Exception):
    """A required setting is missing or malformed; the CLI exits with code 2."""


# --------------------------------------------------------------------------- validation


def parse_accelerator_type(value: str) -> tuple[str, int]:
    """'v4-32' -> ('v4', 32); 'v5e-16' -> ('v5litepod', 16). Raises SettingError."""
    m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", value or "")
    if not m:
        raise SettingError(
            f"bad accelerator type {value!r}: expected GENERATION-SIZE with GENERATION one of "
            "v2, v3, v4, v5p, v5litepod (alias v5e), v6e, e.g. v4-32, v5p-64, v5litepod-16, "
            "v5e-16, v6e-8"
        )
    gen, size = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    unit = GENERATIONS[gen][0]
    if unit == "cores" and (size < 8 or size % 8):
        raise SettingError(
            f"bad accelerator type {value!r}: {gen} sizes count TensorCores "
            "and are multiples of 8 (e.g. {0}-8, {0}-32)".format(gen)
        )
    if unit == "chips" and size not in CHIP_COUNTS:
        raise SettingError(
            f"bad accelerator type {value!r}: {gen} sizes count chips and are "
            f"one of {', '.join(map(str, CHIP_COUNTS))}"
        )
    return gen, size


def canonical_accelerator_type(value: str) -> str:
    """The name gcloud accepts: 'v5e-16' -> 'v5litepod-16'; others unchanged."""
    gen, size = parse_accelerator_type(value)
    return f"{gen}-{size}"


def num_hosts(value: str) -> int:
    """Worker VMs in a slice: 8 TensorCores per host (v2-v5p); v5e/v6e: <=8 chips on 1 host,
    else 4 chips per host."""
    gen, size = parse_accelerator_type(value)
    if GENERATIONS[gen][0] == "cores":
        return size // 8
    return 1 if size <= 8 else size // 4


def default_runtime_version(value: str) -> str:
    return GENERATIONS[parse_accelerator_type(value)[0]][1]


def _check(pattern: str, value: str, what: str, expected: str) -> str:
    if not re.fullmatch(pattern, value):
        raise SettingError(f"bad {what} {value!r}: expected {expected}")
    return value


def _check_home_path(value: str, what: str) -> str:
    """Paths on the workers are relative to $HOME and plain (no quoting needed)."""
    return _check(
        r"(?!/)(?!.*\.\.)[A-Za-z0-9._/-]+",
        value,
        what,
        "a plain path relative to $HOME on the workers (letters, digits, . _ / -)",
    )


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Slice:
    """Where the TPU lives and how to reach it."""

    project: str
    zone: str
    name: str  # the TPU VM node id (also the queued resource's --node-id)
    queued: bool = False
    qr_name: str = ""
    internal_ip: bool = False

    def loc(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]


@dataclasses.dataclass(frozen=True)
class CreateSpec:
    accelerator_type: str  # canonical gcloud name
    runtime_version: str
    spot: bool = False
    preemptible: bool = False
    reserved: bool = False
    service_account: str = ""
    extra: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class InstallSpec:
    git_url: str = ""
    git_rev: str = ""
    wheel: str = ""  # local path of a built wheel
    configs_dir: str = ""  # local configs/ copied next to the wheel
    jax_version: str = ""
    python_version: str = "3.11"
    venv: str = "mae-venv"
    remote_dir: str = "mae-jax"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    run_name: str
    config: str
    workdir: str
    extra_args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # KEY=VALUE
    venv: str = "mae-venv"
    remote_dir: str = "mae-jax"
    log_dir: str = "mae-logs"


def _get(args: argparse.Namespace, key: str, env: dict, flag: str, required: bool) -> str:
    value = getattr(args, key, None) or env.get(ENV[key], "")
    if required and not value:
        raise SettingError(f"missing setting '{key}': pass {flag} or set {ENV[key]}")
    return value


def slice_from_args(args, env) -> Slice:
    project = _get(args, "project", env, "--project=PROJECT_ID", True)
    zone = _get(args, "zone", env, "--zone=ZONE (e.g. us-central2-b)", True)
    name = _get(args, "name", env, "--name=NAME", False) or DEFAULT_NAME
    _check(r"[a-z][-a-z0-9]{4,28}[a-z0-9]", project, "project", "a Google Cloud project id")
    _check(r"[a-z]+-[a-z]+[0-9]+-[a-z]", zone, "zone", "a zone such as us-central2-b")
    _check(
        r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?",
        name,
        "TPU name",
        "lowercase letters, digits and hyphens, starting with a letter",
    )
    qr = args.qr_name or f"{name}-qr"
    _check(
        r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?",
        qr,
        "queued resource name",
        "lowercase letters, digits and hyphens, starting with a letter",
    )
    return Slice(project, zone, name, bool(args.queued), qr, bool(args.internal_ip))


def accelerator_from_args(args, env) -> str:
    value = _get(args, "accelerator_type", env, "--accelerator-type=TYPE (e.g. v4-32)", True)
    return canonical_accelerator_type(value)


def create_spec_from_args(args, env) -> CreateSpec:
    accel = accelerator_from_args(args, env)
    version = _get(args, "runtime_version", env, "--runtime-version", False)
    if args.spot and args.preemptible:
        raise SettingError(
            "--spot and --preemptible exclude each other; pick one (spot is "
            "the current form of preemptible capacity)"
        )
    if args.queued and args.preemptible:
        raise SettingError("queued resources take --spot, not --preemptible")
    if args.reserved and (args.spot or args.preemptible):
        raise SettingError("--reserved cannot be combined with --spot or --preemptible")
    return CreateSpec(
        accel,
        version or default_runtime_version(accel),
        bool(args.spot),
        bool(args.preemptible),
        bool(args.reserved),
        args.service_account or "",
        tuple(args.create_arg or ()),
    )


def install_spec_from_args(args, env) -> InstallSpec:
    venv = _check_home_path(args.venv, "--venv")
    remote_dir = _check_home_path(args.remote_dir, "--remote-dir")
    _check(
        r"3\.(1[1-9]|[2-9][0-9])",
        args.python_version,
        "--python-version",
        "3.11 or newer (jax needs Python >= 3.11)",
    )
    if args.jax_version:
        _check(r"[0-9]+(\.[0-9]+)*", args.jax_version, "--jax-version", "a version like 0.10.2")
    if args.wheel:
        if args.git_url or args.git_rev:
            raise SettingError("give either --wheel or --git-url/--git-rev, not both")
        wheel = os.path.abspath(args.wheel)
        if not wheel.endswith(".whl") or not os.path.isfile(wheel):
            raise SettingError(
                f"--wheel {args.wheel!r} is not an existing .whl file "
                "(build one with: python -m pip wheel --no-deps -w dist .)"
            )
        configs = os.path.abspath(args.configs_dir or os.path.join(REPO_ROOT, "configs"))
        if not os.path.isdir(configs):
            raise SettingError(
                f"--configs-dir {configs!r} is not a directory; the run "
                "needs the config files next to the installed wheel"
            )
        return InstallSpec(
            wheel=wheel,
            configs_dir=configs,
            jax_version=args.jax_version or "",
            python_version=args.python_version,
            venv=venv,
            remote_dir=remote_dir,
        )
    url = _get(args, "git_url", env, "--git-url=URL (or --wheel=FILE.whl)", True)
    rev = _get(args, "git_rev", env, "--git-rev=COMMIT_OR_BRANCH", False) or "main"
    _check(r"[A-Za-z0-9._/-]+", rev, "--git-rev", "a commit, tag or branch name")
    return InstallSpec(
        git_url=url,
        git_rev=rev,
        jax_version=args.jax_version or "",
        python_version=args.python_version,
        venv=venv,
        remote_dir=remote_dir,
    )


def run_spec_from_args(args, env, accelerator_type: str) -> RunSpec:
    config = args.config
    run_name = args.run_name or os.path.splitext(os.path.basename(config))[0]
    _check(
        r"[A-Za-z0-9][A-Za-z0-9._-]*", run_name, "--run-name", "letters, digits, '.', '_' or '-'"
    )
    workdir = args.workdir
    if not workdir:
        bucket = _get(args, "bucket", env, "--bucket=BUCKET (or --workdir=gs://BUCKET/PATH)", True)
        bucket = bucket[len("gs://") :] if bucket.startswith("gs://") else bucket
        _check(
            r"[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/[^\s]*)?",
            bucket.rstrip("/"),
            "bucket",
            "a Cloud Storage bucket name such as my-bucket or gs://my-bucket",
        )
        workdir = f"gs://{bucket.rstrip('/')}/mae-jax/{run_name}"
    hosts = num_hosts(accelerator_type)
    if hosts > 1 and not workdir.startswith("gs://"):
        raise SettingError(
            f"workdir {workdir!r} is not on gs://: a {accelerator_type} slice has {hosts} "
            "hosts, and every host must read and write the same checkpoints. Pass "
            "--workdir=gs://BUCKET/PATH or --bucket=BUCKET"
        )
    for kv in args.env or ():
        _check(r"[A-Za-z_][A-Za-z0-9_]*=.*", kv, "--env", "KEY=VALUE")
    check_training_args(config, args.extra_args, getattr(args, "configs_dir", None))
    return RunSpec(
        run_name,
        config,
        workdir,
        tuple(args.extra_args),
        tuple(args.env or ()),
        _check_home_path(args.venv, "--venv"),
        _check_home_path(args.remote_dir, "--remote-dir"),
    )


def check_training_args(config: str, extra: Sequence[str], configs_dir: str | None) -> None:
    """Load the config here and check the training flags after `--` (config keys and the types
    of their values) as the training command will, before anything starts on the pod."""
    name = config.split(":", 1)[0]
    local = name if os.path.isabs(name) else os.path.join(REPO_ROOT, name)
    if configs_dir and not os.path.exists(local):
        local = os.path.join(os.path.abspath(configs_dir), os.path.basename(name))
    if not os.path.isfile(local):
        raise SettingError(
            f"--config {config!r} is not a file here ({local}); the launcher checks the config "
            "and the flags after `--` before anything starts on the pod"
        )
    variant = config[len(name) :]
    try:
        from mae_jax import cli  # noqa: PLC0415 - only run/supervise need it
    except ImportError as e:
        raise SettingError(
            f"checking the training flags needs the mae_jax package here (pip install -e .): {e}"
        ) from None
    try:
        cli.check_command_line(["main", f"--config={local}{variant}", *extra])
    except cli.CommandLineError as e:
        raise SettingError(f"training flags: {e}") from None


# --------------------------------------------------------------------------- commands

TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]


def home(path: str) -> str:
    """A $HOME-relative path for a remote shell script ($HOME expands, the rest is literal)."""
    return '"$HOME"/' + shlex.quote(path)


def create_cmd(s: Slice, c: CreateSpec) -> list[str]:
    if s.queued:
        argv = (
            QR
            + ["create", s.qr_name, f"--node-id={s.name}"]
            + s.loc()
            + [f"--accelerator-type={c.accelerator_type}", f"--runtime-version={c.runtime_version}"]
        )
    else:
        argv = (
            TPU_VM
            + ["create", s.name]
            + s.loc()
            + [f"--accelerator-type={c.accelerator_type}", f"--version={c.runtime_version}"]
        )
    argv += ["--spot"] * c.spot + ["--preemptible"] * c.preemptible + ["--reserved"] * c.reserved
    argv += ["--internal-ips"] * s.internal_ip
    if c.service_account:
        argv.append(f"--service-account={c.service_account}")
    return argv + list(c.extra)


def describe_cmd(s: Slice) -> list[str]:
    if s.queued:
        return QR + ["describe", s.qr_name] + s.loc() + ["--format=value(state.state)"]
    return TPU_VM + ["describe", s.name] + s.loc() + ["--format=value(state)"]


def delete_cmd(s: Slice) -> list[str]:
    if s.queued:  # --force also deletes the queued resource's nodes
        return QR + ["delete", s.qr_name] + s.loc() + ["--force", "--quiet"]
    return TPU_VM + ["delete", s.name] + s.loc() + ["--quiet"]


def _ssh_opts(s: Slice) -> list[str]:
    # After a recreation the workers have new host keys: do not let that stop the supervisor.
    return ["--strict-host-key-checking=no"] + ["--internal-ip"] * s.internal_ip


def ssh_cmd(s: Slice, script: str, worker: str = "all") -> list[str]:
    return (
        TPU_VM
        + ["ssh", s.name]
        + s.loc()
        + [f"--worker={worker}"]
        + _ssh_opts(s)
        + [f"--command={script}"]
    )


def scp_cmd(s: Slice, local: str, remote: str, recurse: bool = False) -> list[str]:
    return (
        TPU_VM
        + ["scp", local, f"{s.name}:{remote}"]
        + s.loc()
        + ["--worker=all"]
        + (["--recurse"] if recurse else [])
        + _ssh_opts(s)
    )


def _venv_python(venv: str) -> str:
    return home(f"{venv}/bin/python")


def install_script(i: InstallSpec, package: str) -> str:
    """Remote shell script: uv, a Python >= 3.11 venv, then jax[tpu] and the project.
    `package` is a shell word naming what to pip-install (a path under $HOME)."""
    jax = f"jax[tpu]=={i.jax_version}" if i.jax_version else "jax[tpu]"
    uv = home(".local/bin/uv")
    steps = [
        "set -e",
        "python3 -m pip install --user --quiet --upgrade uv || "
        "python3 -m pip install --user --quiet --upgrade --break-system-packages uv",
        f"[ -x {_venv_python(i.venv)} ] || {uv} venv --python {i.python_version} {home(i.venv)}",
    ]
    if i.git_url:
        src = home(i.remote_dir)
        steps += [
            f"[ -d {src}/.git ] || git clone --quiet {shlex.quote(i.git_url)} {src}",
            f"git -C {src} fetch --quiet --tags origin",
            f"git -C {src} checkout --quiet --detach {shlex.quote('origin/' + i.git_rev)} "
            f"2>/dev/null || git -C {src} checkout --quiet --detach {shlex.quote(i.git_rev)}",
        ]
    steps += [
        f"{uv} pip install --python {_venv_python(i.venv)} --upgrade {shlex.quote(jax)} {package}",
        f'{_venv_python(i.venv)} -c \'import jax, mae_jax; print("mae-jax installed, jax", '
        "jax.__version__)'",
    ]
    return "; ".join(steps)


def install_cmds(s: Slice, i: InstallSpec) -> list[list[str]]:
    if i.git_url:
        return [ssh_cmd(s, install_script(i, home(i.remote_dir)))]
    wheel = os.path.basename(i.wheel)
    return [
        ssh_cmd(s, f"mkdir -p {home(i.remote_dir + '/dist')}"),
        scp_cmd(s, i.wheel, f"{i.remote_dir}/dist/"),
        scp_cmd(s, i.configs_dir, f"{i.remote_dir}/", recurse=True),
        ssh_cmd(s, install_script(i, home(f"{i.remote_dir}/dist/{wheel}"))),
    ]


def train_argv(r: RunSpec) -> list[str]:
    """The training command's arguments after the interpreter."""
    return ["-m", "mae_jax.main", f"--config={r.config}", f"--workdir={r.workdir}", *r.extra_args]


def training_command(r: RunSpec) -> str:
    """Human-readable form of what each worker runs (inside its venv)."""
    return shlex.join(["python"] + train_argv(r))


def _prefix(r: RunSpec) -> str:
    return home(f"{r.log_dir}/{r.run_name}")


def run_script(r: RunSpec) -> str:
    """Remote script: start training detached (setsid + nohup, all fds redirected, so the ssh
    session can end), append to this worker's own log, record pid and, later, exit code."""
    p = _prefix(r)
    inner = f"{_venv_python(r.venv)} {shlex.join(train_argv(r))}; " + 'echo $? > "$0"'
    steps = [
        f"mkdir -p {home(r.log_dir)}",
        f"cd {home(r.remote_dir)} || exit 1",
        f'if [ -f {p}.pid ] && kill -0 "$(cat {p}.pid)" 2>/dev/null; then '
        f'echo "{r.run_name} is already running on $(hostname)"; exit 1; fi',
        f"rm -f {p}.exit",
        *[f"export {shlex.quote(kv)}" for kv in r.env],
        f"LOG={p}.$(hostname).log",
        f'setsid nohup sh -c {shlex.quote(inner)} {p}.exit >> "$LOG" 2>&1 < /dev/null & '
        f"echo $! > {p}.pid",
        f'echo "started {r.run_name} on $(hostname): pid $!, log $LOG"',
    ]
    return "; ".join(steps)


def status_script(r: RunSpec) -> str:
    """Prints RUNNING, EXITED <code>, or NOT_STARTED for this worker's training process."""
    p = _prefix(r)
    return (
        f'if [ -f {p}.pid ] && kill -0 "$(cat {p}.pid)" 2>/dev/null; then echo RUNNING; '
        f'elif [ -f {p}.exit ]; then echo "EXITED $(cat {p}.exit)"; '
        f"elif [ -f {p}.pid ]; then echo 'EXITED unknown'; else echo NOT_STARTED; fi"
    )


def stop_script(r: RunSpec, grace_s: int) -> str:
    """SIGTERM the process group (checkpoint-on-preemption gets its chance), SIGKILL after
    grace_s seconds."""
    p = _prefix(r)
    return "; ".join(
        [
            f'if [ ! -f {p}.pid ]; then echo "no {r.run_name} pid file on $(hostname)"; exit 0; fi',
            f"P=$(cat {p}.pid)",
            'kill -TERM -"$P" 2>/dev/null || kill -TERM "$P" 2>/dev/null || true',
            f'i=0; while kill -0 "$P" 2>/dev/null && [ "$i" -lt {int(grace_s)} ]; do '
            "sleep 1; i=$((i+1)); done",
            'if kill -0 "$P" 2>/dev/null; then kill -KILL -"$P" 2>/dev/null || kill -KILL "$P"; fi',
            f"rm -f {p}.pid",
            f'echo "stopped {r.run_name} on $(hostname)"',
        ]
    )


def logs_script(r: RunSpec, lines: int, follow: bool) -> str:
    return f"tail -n {int(lines)} {'-F ' if follow else ''}{_prefix(r)}.$(hostname).log"


# --------------------------------------------------------------------------- runners


class Runner(Protocol):
    def run(self, argv: Sequence[str]) -> tuple[int, str]:
        """Runs argv; returns (exit code, stdout followed by stderr)."""


class SubprocessRunner:
    """Runs commands for real. Output is captured (and echoed) so states can be parsed."""

    def __init__(self, out: TextIO = sys.stdout):
        self.out = out

    def run(self, argv):
        print("+ " + shlex.join(argv), file=self.out, flush=True)
        try:
            p = subprocess.run(list(argv), capture_output=True, text=True)
        except FileNotFoundError:
            return 127, f"{argv[0]}: command not found (install the Google Cloud CLI)"
        text = p.stdout + p.stderr
        if text.strip():
            print(text.rstrip(), file=self.out, flush=True)
        return p.returncode, text


class StreamingRunner(SubprocessRunner):
    """Runs commands with the terminal attached (for `logs -F`)."""

    def run(self, argv):
        print("+ " + shlex.join(argv), file=self.out, flush=True)
        try:
            return subprocess.call(list(argv)), ""
        except FileNotFoundError:
            return 127, f"{argv[0]}: command not found (install the Google Cloud CLI)"


class DryRunner:
    """Prints each command, shell-quoted, one per line; runs nothing."""

    def __init__(self, out: TextIO = sys.stdout):
        self.out = out

    def run(self, argv):
        print(shlex.join(argv), file=self.out, flush=True)
        return 0, ""


def run_all(runner: Runner, cmds: Sequence[Sequence[str]]) -> int:
    """Runs commands in order; stops at the first failure and returns its exit code."""
    for argv in cmds:
        rc, _ = runner.run(argv)
        if rc:
            return rc
    return 0


# --------------------------------------------------------------------------- supervise


def parse_state(rc: int, output: str) -> str:
    """State word from a describe call: READY, PREEMPTED, ACTIVE, ..., MISSING (not found),
    or UNKNOWN (the call failed for another reason: retry, never delete on that)."""
    if rc:
        return MISSING if re.search(r"NOT_FOUND|not found|was not found", output) else "UNKNOWN"
    words = [ln.strip() for ln in output.splitlines() if re.fullmatch(r"[A-Z_]+", ln.strip())]
    return words[-1] if words else "UNKNOWN"


def parse_status(rc: int, output: str) -> str | None:
    """'RUNNING', 'EXITED <code>', 'NOT_STARTED', or None when the check itself failed."""
    if rc:
        return None
    for ln in reversed(output.splitlines()):
        ln = ln.strip()
        if ln == "RUNNING" or ln == "NOT_STARTED" or ln.startswith("EXITED "):
            return ln
    return None


@dataclasses.dataclass
class Supervisor:
    """Keeps one training run alive on a spot / preemptible slice.

    Each poll: describe the slice. Healthy (READY / ACTIVE): check the run on worker 0; start
    it (install + run) if this slice has not run it yet; stop supervising when it has exited
    (code 0: done; non-zero twice in a row on a healthy slice: crashed). Lost (PREEMPTED,
    SUSPENDED, FAILED, missing, ...): delete what is left and create the slice again; the
    next healthy poll reinstalls and restarts the same command, which resumes from the last
    checkpoint in the workdir. At most `max_restarts` restarts after the first start.
    """

    slice: Slice
    create: CreateSpec
    install: InstallSpec
    run: RunSpec
    runner: Runner
    max_restarts: int = 10
    poll_s: float = 60.0
    max_polls: int | None = None  # for tests; None = until done
    sleep: Callable[[float], None] = time.sleep
    log: Callable[[str], None] = lambda msg: print(f"[supervise] {msg}", flush=True)
    skip_first_install: bool = False  # the slice already has the install; never after a create
    restarts: int = 0
    created: bool = False  # this supervisor created a slice (which then needs the install)

    def state(self) -> str:
        return parse_state(*self.runner.run(describe_cmd(self.slice)))

    def status(self) -> str | None:
        return parse_status(*self.runner.run(ssh_cmd(self.slice, status_script(self.run), "0")))

    def launch_cmds(self) -> list[list[str]]:
        skip = self.skip_first_install and not self.created
        return ([] if skip else install_cmds(self.slice, self.install)) + [
            ssh_cmd(self.slice, run_script(self.run))
        ]

    def launch(self) -> bool:
        return run_all(self.runner, self.launch_cmds()) == 0

    def loop(self) -> int:
        ever_started = False  # the run was started (or found running) in this session
        started_here = False  # ... on the current slice
        crash_polls = 0
        polls = 0
        while self.max_polls is None or polls < self.max_polls:
            polls += 1
            state = self.state()
            if state in HEALTHY:
                status = self.status()
                if status is None:
                    self.log(f"slice {state}, training status unknown (ssh failed); retrying")
                elif status == "RUNNING":
                    started_here = ever_started = True
                    crash_polls = 0
                elif started_here and status == "NOT_STARTED":
                    self.log("the run's pid file is gone (stopped with `tpu.py stop`); done")
                    return 0
                elif started_here:
                    code = status.split()[1]
                    if code == "0":
                        self.log("training finished (exit code 0)")
                        return 0
                    crash_polls += 1
                    if crash_polls >= 2:
                        self.log(
                            f"training exited with code {code} on a healthy slice: "
                            "crashed, see `python launch/tpu.py logs`"
                        )
                        return 1
                    self.log(f"training exited with code {code}; re-checking the slice")
                else:
                    if ever_started and self.restarts >= self.max_restarts:
                        self.log(f"max restarts ({self.max_restarts}) reached; giving up")
                        return 1
                    self.log(
                        ("restarting" if ever_started else "starting")
                        + f" {self.run.run_name} on {self.slice.name}"
                    )
                    if self.launch():
                        if ever_started:
                            self.restarts += 1
                            self.log(f"restart {self.restarts}/{self.max_restarts} launched")
                        started_here = ever_started = True
                    else:
                        self.log("install or start failed; retrying after the next poll")
            elif state in LOST:
                started_here = False
                crash_polls = 0
                if ever_started and self.restarts >= self.max_restarts:
                    self.log(
                        f"slice {state}; max restarts ({self.max_restarts}) reached; giving up"
                    )
                    return 1
                self.log(f"slice {state}: recreating {self.slice.name}")
                if state != MISSING:
                    self.runner.run(delete_cmd(self.slice))
                rc, _ = self.runner.run(create_cmd(self.slice, self.create))
                self.created = True
                if rc:
                    self.log(f"create failed (exit {rc}); retrying after the next poll")
            else:
                self.log(f"slice state {state}; waiting")
            self.sleep(self.poll_s)
        self.log(f"stopped after {polls} polls")
        return 0

    def dry_run(self, out: TextIO) -> None:
        """Prints the commands of one iteration: the checks, then the recovery sequence
        ('#' lines are comments)."""
        dry = DryRunner(out)
        print("# poll: slice state, then the run's status on worker 0", file=out)
        dry.run(describe_cmd(self.slice))
        dry.run(ssh_cmd(self.slice, status_script(self.run), "0"))
        print(
            "# if the slice is lost (preempted / suspended / missing): delete, recreate", file=out
        )
        dry.run(delete_cmd(self.slice))
        dry.run(create_cmd(self.slice, self.create))
        print(
            "# once it is healthy again: reinstall, restart the same run (it resumes from "
            "the last checkpoint in the workdir)",
            file=out,
        )
        self.created = True
        for argv in self.launch_cmds():
            dry.run(argv)
        print(f"# poll every {self.poll_s:g}s; at most {self.max_restarts} restarts", file=out)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    env_help = ", ".join(f"{k}: {v}" for k, v in ENV.items())
    p = argparse.ArgumentParser(
        prog="python launch/tpu.py",
        description="Create Cloud TPU slices and run mae-jax training on every worker.",
        epilog=f"Environment variables: {env_help}. Arguments after a bare `--` are passed "
        "to the training command (e.g. -- --config.epochs=800).",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("slice")
    g.add_argument("--project", help=f"Google Cloud project id [{ENV['project']}]")
    g.add_argument("--zone", help=f"zone, e.g. us-central2-b [{ENV['zone']}]")
    g.add_argument("--name", help=f"TPU VM name [{ENV['name']}; default {DEFAULT_NAME}]")
    g.add_argument(
        "--queued",
        action="store_true",
        help="use a queued resource (gcloud compute tpus queued-resources)",
    )
    g.add_argument("--qr-name", help="queued resource id (default NAME-qr)")
    g.add_argument(
        "--internal-ip",
        action="store_true",
        help="create with --internal-ips and ssh/scp with --internal-ip",
    )
    g.add_argument(
        "--dry-run", action="store_true", help="print the commands, one per line, and run nothing"
    )

    accel = argparse.ArgumentParser(add_help=False)
    accel.add_argument(
        "--accelerator-type",
        help=f"e.g. v4-32, v5p-64, v5litepod-16 (= v5e-16), v6e-8 [{ENV['accelerator_type']}]",
    )

    create = argparse.ArgumentParser(add_help=False)
    g = create.add_argument_group("create")
    g.add_argument(
        "--runtime-version",
        help="TPU software version (default per generation: v2-v4 "
        "tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, "
        f"v6e v2-alpha-tpuv6e) [{ENV['runtime_version']}]",
    )
    g.add_argument("--spot", action="store_true", help="spot capacity (can be preempted)")
    g.add_argument(
        "--preemptible",
        action="store_true",
        help="legacy preemptible TPU VM (not for queued resources)",
    )
    g.add_argument("--reserved", action="store_true", help="use reserved capacity")
    g.add_argument("--service-account", help="service account of the TPU VMs")
    g.add_argument(
        "--create-arg",
        action="append",
        metavar="FLAG",
        help="extra flag for the create command, e.g. --create-arg=--network=NET (repeatable)",
    )

    install = argparse.ArgumentParser(add_help=False)
    g = install.add_argument_group("install")
    g.add_argument("--git-url", help=f"repository to clone on every worker [{ENV['git_url']}]")
    g.add_argument("--git-rev", help=f"commit, tag or branch (default main) [{ENV['git_rev']}]")
    g.add_argument("--wheel", help="local mae-jax wheel to copy to every worker instead of git")
    g.add_argument(
        "--configs-dir",
        help="with --wheel: local configs/ to copy (default the repository's configs/)",
    )
    g.add_argument("--jax-version", help="pin jax[tpu]==VERSION (default: latest)")
    g.add_argument("--python-version", default="3.11", help="venv Python (default 3.11)")

    paths = argparse.ArgumentParser(add_help=False)
    g = paths.add_argument_group("worker paths (relative to $HOME)")
    g.add_argument("--venv", default="mae-venv", help="venv directory (default mae-venv)")
    g.add_argument(
        "--remote-dir", default="mae-jax", help="source / configs directory (default mae-jax)"
    )

    runname = argparse.ArgumentParser(add_help=False)
    runname.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"config file, relative to the source dir (default {DEFAULT_CONFIG})",
    )
    runname.add_argument(
        "--run-name",
        help="run name for logs and the default workdir (default: the config's file name)",
    )

    run = argparse.ArgumentParser(add_help=False)
    g = run.add_argument_group("run")
    g.add_argument(
        "--bucket",
        help=f"GCS bucket; workdir defaults to gs://BUCKET/mae-jax/RUN [{ENV['bucket']}]",
    )
    g.add_argument("--workdir", help="workdir (gs://... required on multi-host slices)")
    g.add_argument(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="environment variable for the training processes (repeatable)",
    )

    sub.add_parser(
        "create", parents=[common, accel, create], help="create the TPU VM / queued resource"
    )
    sub.add_parser(
        "install",
        parents=[common, install, paths],
        help="install jax[tpu] and mae-jax on every worker",
    )
    sub.add_parser(
        "run",
        parents=[common, accel, paths, runname, run],
        help="start training on all workers (detached, per-worker logs)",
    )
    lg = sub.add_parser("logs", parents=[common, runname], help="follow a worker's log")
    lg.add_argument("--worker", default="0", help="worker index or 'all' (default 0)")
    lg.add_argument("--lines", type=int, default=100, help="lines of history (default 100)")
    lg.add_argument("--no-follow", action="store_true", help="print and return")
    st = sub.add_parser("stop", parents=[common, runname], help="stop training on all workers")
    st.add_argument(
        "--grace", type=int, default=60, help="seconds between SIGTERM and SIGKILL (default 60)"
    )
    sub.add_parser(
        "status", parents=[common, runname], help="slice state and the run's status on every worker"
    )
    sub.add_parser("delete", parents=[common], help="delete the TPU VM / queued resource")
    sv = sub.add_parser(
        "supervise",
        parents=[common, accel, create, install, paths, runname, run],
        help="keep a spot run alive: recreate, reinstall and restart after preemption",
    )
    sv.add_argument("--max-restarts", type=int, default=10, help="default 10")
    sv.add_argument("--poll-interval", type=float, default=60.0, help="seconds (default 60)")
    sv.add_argument(
        "--skip-install",
        action="store_true",
        help="do not install before the first start (restarts always install)",
    )
    return p


def _split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(
    argv: Sequence[str] | None = None,
    *,
    runner: Runner | None = None,
    env: dict | None = None,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """CLI entry point; returns the exit code. `runner` overrides how commands run (tests)."""
    out = out or sys.stdout
    env = dict(os.environ if env is None else env)
    own, extra = _split_extra(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    args.extra_args = extra
    try:
        s = slice_from_args(args, env)
        if args.cmd in ("create", "supervise"):
            cspec = create_spec_from_args(args, env)
        if args.cmd in ("install", "supervise"):
            ispec = install_spec_from_args(args, env)
        if args.cmd in ("run", "supervise"):
            rspec = run_spec_from_args(args, env, accelerator_from_args(args, env))
        if args.cmd == "supervise" and not rspec.workdir.startswith("gs://"):
            raise SettingError(
                f"workdir {rspec.workdir!r} is not on gs://: supervise "
                "recreates the slice, and its disks with it, so checkpoints "
                "must live in Cloud Storage to resume"
            )
        elif args.cmd in ("logs", "stop", "status"):
            rspec = RunSpec(
                args.run_name or os.path.splitext(os.path.basename(args.config))[0], args.config, ""
            )
            _check(
                r"[A-Za-z0-9][A-Za-z0-9._-]*",
                rspec.run_name,
                "--run-name",
                "letters, digits, '.', '_' or '-'",
            )
        if "--dry-run" in extra:
            raise SettingError(
                "--dry-run comes after `--`, where it would be passed to the "
                "training command; put it before `--`"
            )
        if extra and args.cmd not in ("run", "supervise"):
            raise SettingError(
                f"arguments after `--` are for run/supervise, not {args.cmd}: {shlex.join(extra)}"
            )
    except SettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if runner is None:
        if args.dry_run:
            runner = DryRunner(out)
        elif args.cmd == "logs":
            runner = StreamingRunner(out)
        else:
            runner = SubprocessRunner(out)

    if args.cmd == "create":
        return run_all(runner, [create_cmd(s, cspec)])
    if args.cmd == "install":
        return run_all(runner, install_cmds(s, ispec))
    if args.cmd == "run":
        if not args.dry_run:
            print(f"# each worker runs: {training_command(rspec)}", file=out)
        return run_all(runner, [ssh_cmd(s, run_script(rspec))])
    if args.cmd == "logs":
        return run_all(
            runner, [ssh_cmd(s, logs_script(rspec, args.lines, not args.no_follow), args.worker)]
        )
    if args.cmd == "stop":
        return run_all(runner, [ssh_cmd(s, stop_script(rspec, args.grace))])
    if args.cmd == "status":
        return run_all(runner, [describe_cmd(s), ssh_cmd(s, status_script(rspec))])
    if args.cmd == "delete":
        return run_all(runner, [delete_cmd(s)])
    # supervise
    if args.max_restarts < 0 or args.poll_interval <= 0:
        print("error: --max-restarts must be >= 0 and --poll-interval > 0", file=sys.stderr)
        return 2
    sup = Supervisor(
        s,
        cspec,
        ispec,
        rspec,
        runner,
        max_restarts=args.max_restarts,
        poll_s=args.poll_interval,
        sleep=sleep,
        skip_first_install=args.skip_install,
    )
    if args.dry_run:
        sup.dry_run(out)
        return 0
    return sup.loop()


if __name__ == "__main__":
    sys.exit(main())
