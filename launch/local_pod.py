#!/usr/bin/env python3
"""A TPU pod in miniature: N local processes x M simulated CPU devices, one training run.

Run from the repository root:
  python launch/local_pod.py --num-processes=2 --devices-per-process=4 \\
      --config=configs/smoke.py --workdir=/tmp/mae_pod [-- --config.batch_size=32 ...]

Each process i runs the real training command
  python -m mae_jax.main --config=CONFIG --workdir=WORKDIR \\
      --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i \\
      --config.compilation_cache=none [EXTRA...]
with `JAX_PLATFORMS=cpu` and `XLA_FLAGS=--xla_force_host_platform_device_count=M`, so the N
processes join through JAX's distributed runtime (coordinator on process 0, a free localhost
port unless `--port` is given) and run cross-process collectives on the CPU (gloo, JAX's default
CPU collectives), without the persistent compilation cache (see `train_command`). Arguments
after a bare `--` are appended to every command.

Output: `WORKDIR/logs/process_i.log` per process (appended; each run starts with a header line);
process 0's output is also streamed to stdout, each line prefixed with `[p0] `. If a process
exits non-zero, the others are terminated (SIGTERM, then SIGKILL after `--grace` seconds) and the
launcher exits with that process's code after printing the tail of its log. SIGINT/SIGTERM sent
to the launcher are forwarded to every process (a second one, or `--grace` seconds without exit,
kills them). `--dry-run` prints the exact commands, one per line with their environment, and
starts nothing. Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
TAIL_LINES = 40


# --------------------------------------------------------------------------- commands
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def train_command(
    python: str,
    config: str,
    workdir: str,
    port: int,
    num_processes: int,
    process_id: int,
    extra: Sequence[str] = (),
    module: str = "mae_jax.main",
) -> list[str]:
    """argv of process `process_id`'s training command. Without the persistent compilation
    cache unless EXTRA sets `--config.compilation_cache` (the later flag wins): JAX's cache is
    written by process 0 only and its keys differ between processes, so on a restart process 0
    loaded its programs at once and waited in its first step's all-gather for the others, still
    compiling, past Gloo's 30 s timeout (seen on a loaded 2-core machine)."""
    return [
        python,
        "-m",
        module,
        f"--config={config}",
        f"--workdir={workdir}",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={process_id}",
        "--config.compilation_cache=none",
        *extra,
    ]


def process_env(devices: int, base: dict | None = None) -> dict[str, str]:
    """Environment of one process: CPU platform, `devices` simulated devices (any device-count
    flag already in XLA_FLAGS is replaced), unbuffered output, the repository importable."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_COUNT_FLAG}={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in path if p != REPO_ROOT])
    return env


def env_overrides(env: dict[str, str]) -> dict[str, str]:
    """The variables `process_env` sets (what a dry run shows)."""
    return {k: env[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "PYTHONUNBUFFERED", "PYTHONPATH")}


def log_path(workdir: str, process_id: int) -> str:
    return os.path.join(workdir, "logs", f"process_{process_id}.log")


def format_command(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """One shell-quoted line: `env K=V ... argv...`."""
    prefix = ["env"] + [f"{k}={v}" for k, v in env.items()] if env else []
    return shlex.join(prefix + list(argv))


# --------------------------------------------------------------------------- running
def _set_parent_death_signal() -> None:
    """Linux: the child is SIGKILLed when the launcher dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pump(stream: IO[bytes], log: IO[bytes], echo: IO[str] | None, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        if echo is not None:
            echo.write(prefix + line.decode(errors="replace"))
            echo.flush()
    stream.close()


def tail(path: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            last = collections.deque(f, maxlen=lines)
    except FileNotFoundError:
        return ""
    return b"".join(last).decode(errors="replace")


class Pod:
    """Processes started from `commands[i]` with `envs[i]`, output appended to `logs[i]`;
    process 0's output also echoed to `echo` with the prefix `[p0] `."""

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        envs: Sequence[dict],
        logs: Sequence[str],
        echo: IO[str] | None = sys.stdout,
        grace: float = 30.0,
        poll: float = 0.1,
    ):
        if not commands or not len(commands) == len(envs) == len(logs):
            raise ValueError(
                f"need as many commands ({len(commands)}), environments "
                f"({len(envs)}) and logs ({len(logs)}), at least one"
            )
        self.commands, self.envs, self.logs = list(commands), list(envs), list(logs)
        self.echo, self.grace, self.poll = echo, grace, poll
        self.procs: list[subprocess.Popen] = []
        self._files: list[IO[bytes]] = []
        self._threads: list[threading.Thread] = []
        self._signal: int | None = None
        self._signal_time = 0.0

    def start(self) -> None:
        for i, (argv, env, path) in enumerate(zip(self.commands, self.envs, self.logs)):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            log = open(path, "ab")
            log.write(
                f"=== local_pod {time.strftime('%Y-%m-%d %H:%M:%S')} process {i}: "
                f"{shlex.join(argv)}\n".encode()
            )
            log.flush()
            self._files.append(log)
            kwargs = dict(
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_set_parent_death_signal if sys.platform == "linux" else None,
            )
            if i == 0:  # streamed: through a pipe into the log and the console
                proc = subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs
                )
                t = threading.Thread(
                    target=_pump, args=(proc.stdout, log, self.echo, "[p0] "), daemon=True
                )
                t.start()
                self._threads.append(t)
            else:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kwargs)
            self.procs.append(proc)
            self._say(f"process {i}: pid {proc.pid}, log {path}")

    def _say(self, text: str) -> None:
        if self.echo is not None:
            self.echo.write(f"[local_pod] {text}\n")
            self.echo.flush()

    def send(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        self.send(signal.SIGKILL)

    def on_signal(self, signum, frame=None) -> None:
        """Forward SIGINT/SIGTERM to the processes; a second signal kills them."""
        del frame
        if self._signal is not None:
            self._say(f"signal {signum} again: killing all processes")
            self.kill()
            return
        self._signal, self._signal_time = signum, time.monotonic()
        self._say(f"signal {signum}: forwarding to all processes")
        self.send(signum)

    def _stop_others(self) -> None:
        self.send(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(self.poll)
        self.kill()

    def wait(self) -> int:
        """Wait for all processes; on the first failure stop the rest. Returns the exit code:
        0 if all succeeded, else the first failing process's code (128+signal if it was killed
        by a signal)."""
        failed: int | None = None
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                if failed is None and self._signal is None:
                    for i, c in enumerate(codes):
                        if c not in (None, 0):
                            failed = i
                            break
                    if failed is not None:
                        self._say(
                            f"process {failed} exited with code {codes[failed]}; "
                            "stopping the others"
                        )
                        self._stop_others()
                        codes = [p.wait() for p in self.procs]
                if all(c is not None for c in codes):
                    break
                if self._signal is not None and time.monotonic() - self._signal_time > self.grace:
                    self._say(f"still running {self.grace:g}s after the signal: killing")
                    self.kill()
                    self._signal_time = float("inf")
                time.sleep(self.poll)
        finally:
            for t in self._threads:
                t.join(timeout=5)
            for f in self._files:
                f.close()
        if failed is None:
            if any(p.returncode for p in self.procs):  # stopped by a forwarded signal
                self._say(
                    "stopped by signal %d; exit codes %s"
                    % (self._signal, [p.returncode for p in self.procs])
                )
                return 128 + self._signal
            return 0
        code = self.procs[failed].returncode
        code = 128 - code if code < 0 else code
        sys.stderr.write(
            f"[local_pod] process {failed} failed (exit code {code}); last lines "
            f"of {self.logs[failed]}:\n{tail(self.logs[failed])}"
        )
        sys.stderr.flush()
        return code or 1


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1 :]
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after a bare `--` are appended to every training command.",
    )
    ap.add_argument(
        "--num-processes", "-n", type=int, default=2, help="local processes (default 2)"
    )
    ap.add_argument(
        "--devices-per-process",
        "-m",
        type=int,
        default=4,
        help="simulated CPU devices per process (default 4)",
    )
    ap.add_argument(
        "--config", default="configs/smoke.py", help="config file (default configs/smoke.py)"
    )
    ap.add_argument(
        "--workdir",
        required=True,
        help="the run's workdir (shared by all processes; logs go to WORKDIR/logs/process_i.log)",
    )
    ap.add_argument(
        "--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)"
    )
    ap.add_argument(
        "--python", default=sys.executable, help="Python interpreter (default: this one)"
    )
    ap.add_argument("--module", default="mae_jax.main", help="entry module (default mae_jax.main)")
    ap.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds between SIGTERM and SIGKILL when stopping processes (default 30)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    if args.num_processes < 1:
        ap.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        ap.error(f"--devices-per-process must be >= 1, got {args.devices_per_process}")
    if not 0 <= args.port < 65536:
        ap.error(f"--port must be in [0, 65535] (0: a free one), got {args.port}")
    if args.grace < 0:
        ap.error(f"--grace must be >= 0, got {args.grace}")
    args.extra = extra
    return args


def build(args: argparse.Namespace, port: int):
    """(commands, envs, log paths) of the pod that `args` describes."""
    workdir = os.path.abspath(os.path.expanduser(args.workdir))
    n = args.num_processes
    commands = [
        train_command(args.python, args.config, workdir, port, n, i, args.extra, args.module)
        for i in range(n)
    ]
    env = process_env(args.devices_per_process)
    return commands, [env] * n, [log_path(workdir, i) for i in range(n)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    port = args.port or free_port()
    commands, envs, logs = build(args, port)
    if args.dry_run:
        for argv_i, env in zip(commands, envs):
            print(format_command(argv_i, env_overrides(env)))
        return 0
    pod = Pod(commands, envs, logs, grace=args.grace)
    old = {s: signal.signal(s, pod.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pod.start()
        return pod.wait()
    except BaseException:
        pod.kill()
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
