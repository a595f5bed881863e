"""Preflight: one command, on a laptop's CPU or a TPU VM's host, that checks what can fail on the
pod before a run spends money.

  python -m mae_jax.preflight --config=configs/mae_vit_large.py --topology=v4-32 \
      [--config.KEY=VALUE ...] [--target_images_per_sec=N] [--data_examples=256]

Checks, each isolated (a failure is recorded with its reason and the others still run; one that
needs a failed check is skipped, saying which):
  plan     the config as training resolves it (`tasks.pretrain.plan`): steps, epochs, warm-up,
           peak learning rate, global / per-host / per-device batch, gradient accumulation and
           the mesh on the topology's devices; any config mistake.
  data     opens the configured source (`pipeline.dataset_info`: missing splits, wrong
           `data_dir`s, missing folders), reads and decodes `--data_examples` real examples
           through the real pipeline (`create_pretrain_iterator`), and reports images per
           CPU-second of this host and the host cores `--target_images_per_sec` needs.
  model    the exact model (same preset and options, `benchmark.prepare`) for two real train
           steps on one CPU device at a tiny batch of random images: finite loss and gradients;
           then a checkpoint save and restore round trip (`mae_jax.workdir`) in a scratch folder.
  compile  the real step compiled ahead of time for the topology (`mae_jax.aot`): the TPU
           compiler when libtpu is present, else the labelled CPU stand-in; compile time and
           per-device memory.
  memory   the per-device total against the HBM (a verdict only from the target's own compiler;
           the CPU stand-in's figures are not the TPU's, so it is skipped then).
  launch   `launch/tpu.py create / install / run --dry-run` for the topology (settings from the
           launcher's environment variables, MAE_TPU_PROJECT etc.; skipped when unset).

The programs compiled go to the persistent compilation cache (`config.compilation_cache`, as for
training; not for the TPU compiler's compile-only devices), so a rerun loads them.

Prints a line as each check starts and ends (with its duration), its details, then the checklist
and a verdict: "ready" only when every check ran and passed, else the checks that failed or were
not run (each can refuse a run: a skipped one is a question left open). `--help` lists the flags.
Exit status: 0 when nothing failed, 1 when a check failed, 2 for a bad command line (unknown
`--config.KEY`, a value of the wrong type, a bad --topology), as `mae_jax.main`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh
from jax.tree_util import keystr, tree_flatten_with_path

from mae_jax import aot, benchmark, cli
from mae_jax import sharding as shd
from mae_jax import workdir as wdir
from mae_jax.data import pipeline, throughput
from mae_jax.spec import first_line
from mae_jax.tasks import pretrain

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
CHECKS = ("plan", "data", "model", "compile", "memory", "launch")  # in the order they run
# Steps of the schedule the model check runs on when epoch counts cannot be resolved (no data
# set): long enough that its two steps show the peak learning rate, not a schedule's end.
PLACEHOLDER_STEPS = 1000
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(_REPO_ROOT, "launch", "tpu.py")


class CheckFailed(Exception):
    """A check's verdict is negative; the message is the reason shown in the checklist."""


@dataclasses.dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    summary: str  # one line: what was found, or why it failed / was skipped
    seconds: float


class Checklist:
    """Runs named checks one after the other, each isolated, printing progress to `out`."""

    def __init__(self, out: TextIO | None = None, total: int = 0, skip: Sequence[str] = ()):
        self.out, self.total, self.skip = out or sys.stdout, total, set(skip)
        self.results: dict[str, Result] = {}

    def say(self, line: str) -> None:
        print(f"    {line}", file=self.out, flush=True)

    def run(self, name: str, what: str, fn: Callable[[], str], needs: Sequence[str] = ()) -> Result:
        """`fn()` returns the summary line (PASS); `CheckFailed` or any other exception is a
        FAIL with its first line; `Skipped` a SKIP with its reason. A check named in `skip`, or
        one whose `needs` did not all pass, is a SKIP without running."""
        index = f"[{len(self.results) + 1}/{self.total}]" if self.total else ""
        at = f"preflight {index} {name}:"
        blocked = [n for n in needs if self.results[n].status != PASS]
        if name in self.skip or blocked:
            why = ", ".join(f"{n} {self.results[n].status}" for n in blocked)
            reason = "--skip" if name in self.skip else f"needs {' and '.join(blocked)} ({why})"
            self.results[name] = Result(name, SKIP, reason, 0.0)
            print(f"{at} SKIP ({reason})", file=self.out, flush=True)
            return self.results[name]
        print(f"{at} {what} ...", file=self.out, flush=True)
        t0 = time.perf_counter()
        try:
            status, summary = PASS, fn()
        except (CheckFailed, ValueError) as e:  # ValueError: a bad value, the message says which
            status, summary = FAIL, first_line(e)
        except Skipped as e:
            status, summary = SKIP, first_line(e)
        except Exception as e:  # noqa: BLE001 - a failing check must not stop the others
            status, summary = FAIL, f"{type(e).__name__}: {first_line(e)}"
        seconds = time.perf_counter() - t0
        tail = f" ({summary})" if status != PASS else ""
        print(f"{at} {status} in {seconds:.1f} s{tail}", file=self.out, flush=True)
        self.results[name] = Result(name, status, summary, seconds)
        return self.results[name]

    def format(self, title: str) -> str:
        rows = self.results.values()
        width = max((len(r.name) for r in rows), default=0)
        lines = [f"preflight checklist: {title}"]
        lines += [f"  {r.status}  {r.name:<{width}}  {r.seconds:6.1f} s  {r.summary}" for r in rows]
        counts = {s: sum(r.status == s for r in rows) for s in (PASS, FAIL, SKIP)}
        skipped = [r.name for r in rows if r.status == SKIP]
        if counts[FAIL]:
            verdict = "NOT READY"
        elif skipped:  # any check can refuse a run: ready only when all of them ran
            verdict = f"nothing failed, but not checked: {', '.join(skipped)} (see above)"
        else:
            verdict = "ready"
        lines.append(
            f"preflight: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped"
            f" -> {verdict}"
        )
        return "\n".join(lines)

    @property
    def failed(self) -> bool:
        return any(r.status == FAIL for r in self.results.values())


class Skipped(Exception):
    """A check that cannot run here; the message says why (SKIP, not FAIL)."""


def memory_verdict(report: dict, platform: str) -> str:
    """The fit of an `aot.check` report on a `platform` ('tpu' or 'gpu') target: the summary
    when it fits; `CheckFailed` when it does not; `Skipped` when the report is the CPU
    stand-in's (its figures are not the target compiler's, so they give no verdict)."""
    verdict = (
        f"{aot.gib(report['total_bytes'])} of {aot.gib(report['hbm_bytes'])} HBM per device "
        f"({100 * report['fraction_of_hbm']:.0f}%)"
    )
    if report["stand_in"]:
        raise Skipped(
            f"the CPU stand-in's {verdict} is not the {platform.upper()} compiler's figure; "
            "install libtpu (docs/performance.md) for a verdict"
        )
    if not report["fits"]:
        raise CheckFailed(f"{verdict} -> DOES NOT FIT; {aot.FIT_HINT}")
    return f"{verdict} -> FITS"


def load_launcher():
    """`launch/tpu.py` as a module, or None when the package runs without its repository."""
    if not os.path.isfile(LAUNCHER):
        return None
    name = "mae_jax_launch_tpu"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, LAUNCHER)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclasses.dataclass
class Options:
    config_path: str  # as given to --config (FILE or FILE:VARIANT)
    overrides: list[str]  # the --config.KEY=VALUE arguments, passed on to the launcher
    topology: str
    backend: str = "auto"
    hbm_gib: float | None = None
    libtpu_path: str | None = None
    data_examples: int = 256
    data_batch: int = 32
    tiny_batch: int = 2
    target_images_per_sec: float | None = None
    scratch_dir: str | None = None
    skip: tuple[str, ...] = ()  # names of checks not to run


class Preflight:
    """The checks of one config on one topology; `run()` returns the exit status."""

    def __init__(self, config: ml_collections.ConfigDict, opts: Options, out: TextIO | None = None):
        self.config, self.opts, self.out = config, opts, out or sys.stdout
        self.topo = aot.parse_topology(opts.topology, opts.hbm_gib)
        # Before JAX starts: the CPU stand-in needs one host device per target device; the
        # compilation cache is on, so a rerun loads the checks' programs.
        self.backend = aot.select_backend(config, self.topo, opts.backend, opts.libtpu_path)
        self.stand_in = self.backend != self.topo.platform
        self.launcher = load_launcher()
        # Host VMs (processes): the launcher's count for Cloud TPU slices; one for GPU topologies
        # (one process per machine is not assumed beyond that).
        tpu = self.topo.platform == "tpu" and self.launcher is not None
        self.hosts = self.launcher.num_hosts(opts.topology) if tpu else 1
        self.checks = Checklist(out, total=len(CHECKS), skip=opts.skip)
        self.info = None  # the data set's DatasetInfo, once the data check opened it
        self.plan = None
        self.placeholder_schedule = False  # the plan's steps stand in for unresolved epochs
        self.aot_report: dict | None = None

    # ------------------------------------------------------------------ checks
    def check_plan(self) -> str:
        c = self.config
        if c.get("task", "pretrain") != "pretrain":
            raise CheckFailed(
                f"config.task={c.get('task')!r}: the preflight checks pretraining configs"
            )
        say = self.checks.say
        try:
            self.info = pipeline.dataset_info(c.data)
        except Exception as e:  # noqa: BLE001 - reported by the data check; plan without it
            say(f"data set size unknown ({first_line(e)}); the data check reports it")
        n = self.info.num_train_examples if self.info else None
        if n is None and c.total_steps is None:
            p = pretrain.plan_without_data(c, PLACEHOLDER_STEPS)
            self.placeholder_schedule = True
            steps = short = "unresolved (epoch counts need the data set size)"
        else:
            p = pretrain.plan(c, n, info=self.info)  # also checks the kNN monitor keys
            r = p.run
            epochs = f" = {r.total_steps / r.steps_per_epoch:.4g} epochs" if n else ""
            short = f"{r.total_steps:,} steps{epochs}"
            steps = (
                short
                + (f" of {r.steps_per_epoch:,} steps ({n:,} examples)" if n else "")
                + f", warm-up {r.warmup_steps:,} steps"
            )
        self.plan = p
        shape = shd.mesh_shape(c.mesh, self.topo.num_devices)
        mesh = AbstractMesh(shape, shd.MESH_AXES)
        pretrain.check_mesh(c, mesh)
        if c.batch_size % self.hosts:
            raise CheckFailed(
                f"config.batch_size={c.batch_size} is not divisible by the {self.hosts} hosts of "
                f"{self.topo.name}"
            )
        per_device = c.batch_size // c.grad_accum_steps // shd.data_parallel_size(mesh)
        axes = dict(zip(shd.MESH_AXES, shape))
        oc, m = p.run.optim, p.model
        say(f"model: {m.name} ({m.dtype} compute, {m.param_dtype} params, remat={m.remat})")
        say(f"steps: {steps}")
        say(
            f"learning rate: peak {oc.lr:.3g} ({oc.name}, batch {c.batch_size}), cosine to "
            f"{oc.get('min_lr', 0.0):g}"
        )
        say(
            f"batch: global {c.batch_size}, grad_accum_steps {c.grad_accum_steps}, "
            f"{c.batch_size // self.hosts} per host ({self.hosts} host(s)), {per_device} per "
            "device per micro-step"
        )
        say(f"mesh: {axes} on {self.topo.num_devices} devices")
        say(
            f"checkpoints: every {p.run.periods['checkpoint_every_steps']} steps, keep {c.keep_checkpoints}"
            + (f", milestones every {p.run.milestone_every} steps" if p.run.milestone_every else "")
        )
        return (
            f"{m.name}, {short}, batch {c.batch_size} ({per_device}/device), lr {oc.lr:.3g}, "
            f"mesh {axes}"
        )

    def check_data(self) -> str:
        c, o, say = self.config, self.opts, self.checks.say
        try:
            info = self.info or pipeline.dataset_info(c.data)
            where = pipeline.describe_source(c.data)
        except Exception as e:  # noqa: BLE001 - any reason the source cannot be opened
            raise CheckFailed(f"cannot open the {c.data.source} data: {first_line(e)}") from None
        say(f"source: {where}")
        say(f"examples: {info.num_train_examples:,} train, {info.num_eval_examples or 0:,} eval")
        batch = max(1, min(o.data_batch, o.data_examples))
        batches = max(2, math.ceil(o.data_examples / batch))
        it = pipeline.create_pretrain_iterator(
            c.data, global_batch_size=batch, seed=c.seed, process_index=0, process_count=1
        )
        try:
            first = next(it)  # opening the files and the first decode: not timed
            throughput.wait_idle()
            wall, cpu, last = throughput.time_batches(it, batches - 1)
        except pipeline.InputError as e:
            raise CheckFailed(f"{where}: {first_line(e)}") from None
        finally:
            it.close()
        size = c.data.image_size
        shape = (batch, size, size, 3)
        for b in (first, last):
            if b["image"].shape != shape:
                raise CheckFailed(f"batches have shape {b['image'].shape}, expected {shape}")
        if not np.isfinite(last["image"]).all():
            raise CheckFailed("a decoded batch holds non-finite pixel values")
        timed = batch * (batches - 1)
        rate = timed / cpu
        say(
            f"read {batch * batches} examples ({batches} batches of {batch}, {size} px); the "
            f"{timed} after the first batch: {timed / wall:.0f} images/s wall, {rate:.0f} "
            f"images per CPU-second, {it.skipped} unreadable skipped"
        )
        summary = f"{where}: {rate:.0f} images per CPU-second"
        if it.skipped:
            summary += f", {it.skipped} of {batch * batches} unreadable"
        if o.target_images_per_sec:
            per_host = o.target_images_per_sec / self.hosts
            cores = throughput.cores_needed(per_host, rate)
            say(
                f"target {o.target_images_per_sec:g} images/s over {self.hosts} host(s) = "
                f"{per_host:g} per host -> {cores:.1f} host cores for decoding at this cost "
                f"(this machine has {os.cpu_count()})"
            )
            summary += f"; {cores:.1f} cores per host for {o.target_images_per_sec:g} images/s"
        return summary

    def check_model(self) -> str:
        c, o, say = self.config, self.opts, self.checks.say
        tiny = ml_collections.ConfigDict(c.to_dict())
        accum = c.grad_accum_steps
        tiny.batch_size = accum * max(1, math.ceil(o.tiny_batch / accum))
        tiny.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
        tiny.total_steps, tiny.warmup_steps = self.plan.run.total_steps, self.plan.run.warmup_steps
        tiny.epochs = tiny.warmup_epochs = None  # the plan's, in steps
        cpu = jax.devices("cpu")[:1]
        t0 = time.perf_counter()
        pr = benchmark.prepare(tiny, tiny.total_steps, devices=cpu)
        say(
            f"{pr.plan.model.name} at batch {tiny.batch_size} on {cpu[0].device_kind} "
            f"(init {time.perf_counter() - t0:.1f} s)"
        )
        if self.placeholder_schedule:
            say(
                f"schedule: a placeholder of {PLACEHOLDER_STEPS} steps without warm-up (the real "
                "one needs the data set size), so the learning rate is about the peak"
            )
        state, losses, norms = pr.state, [], []
        pr.state = None
        for i in range(2):
            t0 = time.perf_counter()
            state, metrics = pr.fns.step(state, pr.batch, pr.key)
            m = jax.device_get(metrics)
            took = time.perf_counter() - t0
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
            say(
                f"step {i + 1}: loss {losses[-1]:.4f}, grad norm {norms[-1]:.4g}, lr "
                f"{float(m['lr']):.3g} ({took:.1f} s{', compile included' if i == 0 else ''})"
            )
        if not all(math.isfinite(v) for v in losses + norms):
            raise CheckFailed(f"non-finite loss or gradients: losses {losses}, grad norms {norms}")
        if int(jax.device_get(state["step"])) != 2:
            raise CheckFailed(f"the state counts {int(state['step'])} steps after 2")
        with tempfile.TemporaryDirectory(prefix="mae_preflight_", dir=o.scratch_dir) as tmp:
            meta = {**pretrain.checkpoint_meta(pr.plan), "step": 2, "seed": c.seed}
            t0 = time.perf_counter()
            with wdir.Writer(tmp, keep=1, handle_sigterm=False) as wd:
                wd.save(2, wdir.to_checkpoint(state), meta)
            save_s = time.perf_counter() - t0
            on_disk = sum(
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs
            )
            t0 = time.perf_counter()
            restored = wdir.Reader(tmp).restore(  # as a resuming run reads it
                wdir.abstract_checkpoint(pr.fns.abstract_state, pr.fns.state_shardings),
                check_meta=lambda meta, step: pretrain.check_workdir_model(
                    meta, pr.plan.model, tmp, step
                ),
            )
            resumed = wdir.from_checkpoint(restored.state, pr.fns.abstract_state)
            restore_s = time.perf_counter() - t0
        del restored
        # leaf by leaf (no second copy of a large state in host memory)
        saved = tree_flatten_with_path(wdir.to_checkpoint(state))[0]
        again = tree_flatten_with_path(wdir.to_checkpoint(resumed))[0]
        if [p for p, _ in saved] != [p for p, _ in again]:
            raise CheckFailed(f"restored {len(again)} arrays, saved {len(saved)} (other names)")
        for (path, a), (_, b) in zip(saved, again, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype != b.dtype or not np.array_equal(a, b):  # also False for other shapes
                raise CheckFailed(f"restored {keystr(path)} differs from what was saved")
        say(
            f"checkpoint round trip: {len(saved)} arrays, {aot.gib(on_disk)} on disk, saved in "
            f"{save_s:.1f} s, restored identical in {restore_s:.1f} s"
        )
        return (
            f"2 steps at batch {tiny.batch_size}: loss {losses[0]:.4f} -> {losses[1]:.4f}, "
            f"grad norm {norms[1]:.3g}; checkpoint round trip of {aot.gib(on_disk)} identical"
        )

    def check_compile(self) -> str:
        if self.stand_in:
            self.checks.say(
                f"no {self.topo.platform.upper()} compiler here: the CPU stand-in compiles the "
                f"same program for {self.topo.num_devices} host devices (its memory figures are "
                "the CPU compiler's, not the target's)"
            )
        try:
            r = aot.check(
                self.config, self.topo, backend=self.backend, libtpu_path=self.opts.libtpu_path
            )
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise CheckFailed(aot.out_of_memory_message(e, self.topo.name)) from None
        self.aot_report = r
        for line in aot.format_report(r, verdict=not r["stand_in"]).splitlines():
            self.checks.say(line)
        kind = "CPU stand-in" if r["stand_in"] else f"{r['compiled_for_backend']} compiler"
        return (
            f"{kind}: lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s, "
            f"{aot.gib(r['total_bytes'])} per device"
        )

    def check_memory(self) -> str:
        return memory_verdict(self.aot_report, self.topo.platform)

    def check_launch(self) -> str:
        tpu = self.launcher
        if tpu is None:
            raise Skipped(f"{LAUNCHER} is not here (the package runs without its repository)")
        if self.topo.platform != "tpu":
            raise Skipped(f"{self.topo.name} is not a Cloud TPU slice; launch/tpu.py is for TPUs")
        env = dict(os.environ)
        needed = ("project", "zone", "bucket", "git_url")
        missing = [tpu.ENV[k] for k in needed if not env.get(tpu.ENV[k])]
        if missing:
            raise Skipped(f"the launcher's settings are not set: {', '.join(missing)}")
        accel = ["--accelerator-type", self.opts.topology]
        calls = [
            ["create", "--dry-run", *accel],
            ["install", "--dry-run"],
            ["run", "--dry-run", *accel, f"--config={self.opts.config_path}"]
            + (["--", *self.opts.overrides] if self.opts.overrides else []),
        ]
        count = 0
        for argv in calls:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = tpu.main(argv, env=env, out=out)
            if rc:
                raise CheckFailed(
                    f"launch/tpu.py {argv[0]} --dry-run: exit {rc}: "
                    f"{first_line(ValueError(err.getvalue() or out.getvalue()))}"
                )
            self.checks.say(f"python launch/tpu.py {shlex.join(argv)}")
            for line in out.getvalue().splitlines():
                self.checks.say(f"  {line}")
                count += 1
        return f"{count} gcloud commands for {self.opts.topology} ({self.hosts} host(s)), dry run"

    # ------------------------------------------------------------------ all
    def run(self) -> int:
        ck = self.checks
        ck.run("plan", "resolving the config for the topology", self.check_plan)
        ck.run("data", "opening the source and reading real examples", self.check_data)
        steps = f"two train steps at batch {self.opts.tiny_batch} on the CPU, checkpoint round trip"
        ck.run("model", steps, self.check_model, needs=["plan"])
        compiler = "CPU stand-in" if self.stand_in else f"{self.backend.upper()} compiler"
        compiling = f"compiling the train step for {self.topo.name} ({compiler})"
        ck.run("compile", compiling, self.check_compile, needs=["plan"])
        ck.run("memory", "per-device memory against HBM", self.check_memory, needs=["compile"])
        ck.run("launch", "launch commands (dry run)", self.check_launch, needs=["plan"])
        title = f"{self.opts.config_path} on {self.topo.name} ({self.backend} compiler)"
        print(ck.format(title), file=self.out, flush=True)
        return 1 if ck.failed else 0


# ------------------------------------------------------------------------------ CLI
def _define_flags(fv, argv: list[str]):
    from absl import flags
    from ml_collections import config_flags

    kw = {"flag_values": fv}  # not absl's global FLAGS
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Pretraining config file.",
        lock_config=True,
        sys_argv=argv,  # where the --config.KEY overrides are found (not sys.argv: tests)
        **kw,
    )
    flags.DEFINE_string("topology", None, "Target, e.g. v4-32, v5p-64, v5e-16, h100-8.", **kw)
    flags.DEFINE_enum(
        "backend",
        "auto",
        ["auto", "tpu", "gpu", "cpu"],
        "Compiler for the compile check (mae_jax.aot): auto = the target's own when present.",
        **kw,
    )
    flags.DEFINE_float("hbm_gib", None, "Per-device memory in GiB (default: the target's).", **kw)
    flags.DEFINE_string("libtpu_path", None, "Path of libtpu.so (see mae_jax.aot).", **kw)
    flags.DEFINE_integer("data_examples", 256, "Real examples the data check reads.", **kw)
    flags.DEFINE_integer("tiny_batch", 2, "Batch of the model check's two CPU steps.", **kw)
    flags.DEFINE_float(
        "target_images_per_sec",
        None,
        "Global input rate the run needs: the data check says how many host cores that takes.",
        **kw,
    )
    flags.DEFINE_string(
        "scratch_dir", None, "Where the checkpoint round trip writes (default: the temp dir).", **kw
    )
    flags.DEFINE_list(
        "skip", [], f"Checks not to run (recorded as skipped): any of {', '.join(CHECKS)}.", **kw
    )
    flags.mark_flags_as_required(["config", "topology"], **kw)


def options(fv, argv: Sequence[str]) -> Options:
    """The checked options of parsed flags `fv`; `argv`: the command line (for the overrides the
    launcher is given). `CommandLineError` for a bad value."""
    try:
        aot.parse_topology(fv.topology, fv.hbm_gib)
    except ValueError as e:
        raise cli.CommandLineError(str(e)) from None
    for name in ("data_examples", "tiny_batch"):
        if getattr(fv, name) < 1:
            raise cli.CommandLineError(f"--{name} must be at least 1, got {getattr(fv, name)}")
    unknown = [name for name in fv.skip if name not in CHECKS]
    if unknown:
        raise cli.CommandLineError(
            f"--skip names unknown checks {unknown}; the checks are {', '.join(CHECKS)}"
        )
    if fv.target_images_per_sec is not None and fv.target_images_per_sec <= 0:
        raise cli.CommandLineError(
            f"--target_images_per_sec must be positive, got {fv.target_images_per_sec}"
        )
    values = {f.name: getattr(fv, f.name) for f in dataclasses.fields(Options) if f.name in fv}
    values["skip"] = tuple(values["skip"])
    return Options(cli.config_path(list(argv)), cli.config_overrides(list(argv)), **values)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mae_jax.preflight ...`; returns the exit status (0, 1, or 2)."""
    from absl import flags

    argv = list(sys.argv if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    fv = flags.FlagValues()
    _define_flags(fv, argv)
    if any(arg in ("-h", "-help", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
        print(f"{__doc__.strip()}\n\nFlags:\n{fv.get_help()}", flush=True)
        return 0
    try:
        cli.parse(cli.check_and_parse(fv), argv)
        opts = options(fv, argv[1:])
    except cli.CommandLineError as e:
        return cli.report(e)
    cli.quiet_library_logs()
    cli.import_tensorflow_quietly()
    try:
        return Preflight(fv.config, opts).run()
    except ValueError as e:  # the backend cannot be set up (e.g. --backend=tpu without libtpu)
        return cli.report(cli.CommandLineError(str(e)))


if __name__ == "__main__":
    sys.exit(main())
