"""The pretraining loop: config checks, init or resume, train steps, metrics, checkpoints.

`train_and_evaluate(config, workdir)` is what `python -m mae_jax.main` runs. Rerunning it on
the same workdir resumes from the latest complete checkpoint (parameters, optimizer state,
step, and the data position; the masking noise is a function of `(seed, step)`).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mae_jax import compile_cache, flops, metrics, optim, profiler, schema
from mae_jax import sharding as shd
from mae_jax import train_step as ts
from mae_jax import workdir as wdir
from mae_jax.data import pipeline


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss, mismatched workdir)."""


class Stopped(KeyboardInterrupt):
    """A run stopped by Ctrl-C after its last completed step was saved (`run`)."""


# ------------------------------------------------------------------------------ the loop
@dataclasses.dataclass
class Task:
    """What the generic training loop needs from one kind of training.

    `fns.step(state, batch, key)` takes the global batch (a dict of sharded arrays, from
    `device_keys` of the host batch) and returns `(state, metrics)`; the state is a dict with
    at least `params`, `step` and `nonfinite_step`. `init()` builds the starting state (fresh, or
    from `config.init_from`). `meta()` is stored with every checkpoint; `check_meta(meta, step)`
    refuses a checkpoint of another model. `resolved` is the config with the numbers the run
    uses (written to `config.json`). `periodic`: `(every, fn)` pairs, `fn(writer, state,
    host_batch, step, should_stop)` runs after every `every`-th step and the last (0: never),
    may log extras and return scalars; long work in it (evaluation passes) polls `should_stop()`
    between batches and raises `pipeline.Interrupted` when it is True (the loop then saves the
    step and stops); at the last step it runs to its end. `check_batch(host_batch)` (optional)
    refuses a batch before its step (e.g. bad labels).
    """

    name: str
    fns: ts.StepFns
    init: Callable[[], Any]
    total_steps: int
    batch_size: int
    make_data: Callable[..., Any]
    meta: Callable[[], dict]
    check_meta: Callable[[dict, int], None]
    resolved: dict
    device_keys: tuple[str, ...] = ("image",)
    flops_per_image: float | None = None
    periodic: tuple[tuple[int, Callable[[Any, dict, dict, int, Callable], dict | None]], ...] = ()
    check_batch: Callable[[dict], None] | None = None  # host batch, before its step


# (step, meta) of the newest finalized checkpoint of the workdir a run resumes, or None.
Resume = tuple[int, dict] | None


# ------------------------------------------------------------------------------ config and plan
@dataclasses.dataclass(frozen=True)
class Plan:
    """The resolved numbers of a run (every task)."""

    steps_per_epoch: int | None
    optim: ml_collections.ConfigDict  # the optimizer keys, num_layers filled, lr: the peak
    lr_fn: optim.Schedule  # step -> lr: the optimizer's and the logged one, built once here
    schedule: dict  # what checkpoints record (`resolve_schedule`)
    periods: dict  # every period of the task in steps, by its `<name>_steps` key (0: off)

    total_steps = property(lambda self: self.periods["total_steps"])
    warmup_steps = property(lambda self: self.periods["warmup_steps"])
    milestone_every = property(lambda self: self.periods["keep_every_steps"])


def plan(
    config,
    num_train_examples: int | None,
    resume: Resume = None,
    where: str = "",
    optim_overrides: dict | None = None,
) -> Plan:
    """Validate `config` against its task's schema (`schema.check`: the one place) and resolve
    its periods in steps (`schema.steps`), its optimizer and its learning-rate schedule (nothing
    is compiled). A resumed run continues its recorded schedule (`resolve_schedule`)."""
    schema.check(config, config.get("task"))
    batch = config.batch_size
    steps_per_epoch = max(1, num_train_examples // batch) if num_train_examples else None
    periods = {
        p.steps_key: schema.steps(config, p, steps_per_epoch) or 0
        for p in schema.PERIODS
        if p.steps_key in config
    }
    if not periods["total_steps"]:
        raise ValueError("the run's length is not set: set config.total_steps or config.epochs")
    total = periods["total_steps"]
    oc = ml_collections.ConfigDict({**config.optim.to_dict(), **(optim_overrides or {})})
    schedule = resolve_schedule(
        total, min(periods["warmup_steps"], total), resume, where, oc.min_lr
    )
    periods["warmup_steps"] = min(schedule["warmup_steps"], total)
    oc.lr = optim.peak_learning_rate(oc, batch)
    lr_fn = optim.extended_schedule(
        oc.lr, total, periods["warmup_steps"], oc.min_lr, schedule["extensions"]
    )
    return Plan(steps_per_epoch, oc, lr_fn, schedule, periods)


def check_batches(mesh, batches: dict[str, int]) -> None:
    """Each named global batch must split evenly over the data-parallel devices of `mesh` and
    over the processes."""
    dp, procs = shd.data_parallel_size(mesh), jax.process_count()
    for name, batch in batches.items():
        if batch % dp or batch % procs:
            raise ValueError(
                f"{name}={batch} is not divisible by the data-parallel size {dp} (mesh "
                f"{dict(mesh.shape)}) and the process count {procs}; change it or config.mesh"
            )


def resolve_schedule(
    total: int, warmup: int, resume: Resume, where: str, min_lr: float = 0.0
) -> dict:
    """The run's schedule: `{'total_steps', 'warmup_steps', 'extensions'}`.

    A resumed run keeps the warm-up it started with and records a change of its length as an
    extension at the resume step (`optim.extended_schedule`: no jump in the lr); a length below
    the steps already done is refused. Extending a finished run (its lr at `min_lr`) is said
    plainly, with the `init_from` command that starts a new schedule instead.
    """
    schedule = {"total_steps": int(total), "warmup_steps": int(warmup), "extensions": []}
    if resume is None:
        return schedule
    step, meta = resume
    if total < step:
        raise wdir.WorkdirError(
            f"the run in {where} has already done {step} steps; the config asks for "
            f"{total} in all, which is fewer: ask for at least {step} steps (or use a new "
            f"--workdir)"
        )
    saved = meta.get("schedule")
    if not saved:
        return schedule
    schedule["warmup_steps"] = int(saved["warmup_steps"])
    schedule["extensions"] = [list(e) for e in saved.get("extensions", [])]
    if int(saved["total_steps"]) != total:
        schedule["extensions"].append([int(step), int(saved["total_steps"])])
        if step >= int(saved["total_steps"]) and total > step:
            logging.warning(
                "%s: the run finished its schedule at step %d, so the %d added steps run at its "
                "final learning rate, config.optim.min_lr=%g (a finished cosine does not "
                "restart); to train them on a new schedule, start a new run from its weights "
                "instead: python -m mae_jax.main --config=<the same config> --workdir=<a new "
                "dir> --config.init_from.path=%s --config.total_steps=%d --config.epochs=0",
                where,
                step,
                total - step,
                min_lr,
                where,
                total - step,
            )
        else:
            logging.info(
                "%s: run length changed from %d to %d steps at step %d: the learning rate "
                "continues from its current value with the same cosine to the new end",
                where,
                saved["total_steps"],
                total,
                step,
            )
    return schedule


def resolved_config(config, p: Plan) -> dict:
    """`config` as a dict with the numbers the run uses: every period in steps (its epochs key
    None) and the optimizer with its peak lr."""
    out = json.loads(config.to_json_best_effort())
    for period in schema.PERIODS:
        if period.steps_key in out:
            out[period.steps_key], out[period.epochs_key] = p.periods[period.steps_key], None
    out["optim"] = json.loads(p.optim.to_json_best_effort())
    return out


def run(config: ml_collections.ConfigDict, workdir: str, make_task: Callable[..., Task]) -> dict:
    """Init or resume `make_task(mesh, resume)`'s state in `workdir` and train it to the end.

    Common config keys: seed, mesh, checkpoint_every_steps, keep_checkpoints,
    keep_every_epochs, log_every_steps, peak_tflops, compilation_cache (`mae_jax.compile_cache`),
    profile_steps (`profiler.window`). Returns the last logged metrics. A Ctrl-C saves the last
    completed step like a preemption notice and then raises `Stopped`, once the workdir is closed.
    """
    profile = profiler.window(config.get("profile_steps"))
    mesh = shd.make_mesh(config.mesh)
    compile_cache.enable(config.get("compilation_cache", compile_cache.AUTO), jax.process_count())
    root = wdir.normalize(workdir)
    # Validate everything before writing anything: the task is planned from a read-only look
    # at the workdir, then planned again under the lock if a checkpoint landed in between.
    latest = _latest(root)
    task = make_task(mesh, latest)
    if _complete(task, latest, root):
        return {"step": latest[0], "complete": True}
    with wdir.Writer(root, keep=config.keep_checkpoints) as wd:
        again = wd.reader().latest_meta()
        if again != latest:
            latest, task = again, make_task(mesh, again)
            if _complete(task, latest, root):
                return {"step": latest[0], "complete": True}
        wd.keep_every = task.resolved["keep_every_steps"]
        try:
            with compile_cache.CompileEvents() as startup:
                last = _train(config, wd, task, mesh, latest is not None, profile, startup)
        except Exception as e:
            if not wdir.is_disk_full(e):  # checkpoints say it themselves (`Writer.save`)
                raise
            raise wd.disk_full(e) from None
    if wd.stop_signal == signal.SIGINT:
        raise Stopped(f"stopped by Ctrl-C; rerun the same command to resume ({root})")
    return last


def _complete(task: Task, latest: Resume, root: str) -> bool:
    if latest is None or latest[0] != task.total_steps:
        return False
    task.check_meta(latest[1], latest[0])  # another model is refused, finished or not
    print(
        f"{task.name}: the run in {root} is already complete ({latest[0]} of "
        f"{task.total_steps} steps); nothing to do",
        flush=True,
    )
    return True


def _latest(root: str) -> Resume:
    """The newest readable checkpoint's `(step, meta)` of a workdir, read-only; None if none.
    A workdir of imported weights is refused (it is a source for `init_from`, not a run)."""
    if not wdir.exists(root):
        return None
    latest = wdir.Reader(root).latest_meta()
    if latest is not None and latest[1].get("kind") == "weights":
        raise wdir.WorkdirError(
            f"{root} holds imported weights ({latest[1].get('source', '?')}), not a training "
            f"run: start a run from them with --config.init_from.path={root} and a new --workdir"
        )
    return latest


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When a run logs, saves and does its periodic work, in steps (0: never)."""

    total_steps: int
    checkpoint_every: int
    log_every: int
    milestone_every: int = 0
    periodic: tuple = ()  # `Task.periodic`: (every, work) pairs


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the loop does once a step is complete."""

    log: bool = False
    save: bool = False
    periodic: tuple = ()  # the `Task.periodic` work due
    final: bool = False
    stop: bool = False


def _due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def decide(done: int, c: Cadence, preempted: bool, waiting: bool = False) -> Decision:
    """What to do when `done` steps are complete. The first and the last step and every
    `log_every`-th are logged; every `checkpoint_every`-th and `milestone_every`-th and the
    last are saved; periodic work runs at multiples of its period and at the last step. A
    preemption saves the step and stops; `waiting`: the notice came while waiting for the next
    batch (nothing new ran: save `done` and stop)."""
    if waiting:
        return Decision(save=True, stop=True)
    final = done == c.total_steps
    due = tuple(work for every, work in c.periodic if every and (final or _due(done, every)))
    saves = (c.checkpoint_every, c.milestone_every)
    return Decision(
        log=_due(done, c.log_every) or done == 1 or final,
        save=preempted or final or any(_due(done, e) for e in saves),
        periodic=due,
        final=final,
        stop=preempted,
    )


def _train(
    config,
    wd: wdir.Writer,
    task: Task,
    mesh,
    resumable: bool,
    profile: tuple[int, int] | None,
    startup: compile_cache.CompileEvents,
) -> dict:
    # ---- start-up: init or restore, writers, data
    fns, restored = task.fns, None
    if resumable:
        target = wdir.abstract_checkpoint(fns.abstract_state, fns.state_shardings)
        restored = wd.restore(target, check_meta=task.check_meta)
    if restored is None:
        state, position = task.init(), 0
        logging.info(
            "%s: initialized (%s trainable parameters)", task.name, f"{_count(state['params']):,}"
        )
    else:
        state = wdir.from_checkpoint(restored.state, fns.abstract_state)
        state = fns.set_window(state, restored.meta.get("window"))  # older checkpoints: none
        position = int(restored.meta.get("data_position", restored.step))
        logging.info("resumed from step %d (data position %d)", restored.step, position)
    start = int(jax.device_get(state["step"]))
    wd.write_config(task.resolved, start)
    primary = jax.process_index() == 0
    if primary:  # drop lines of steps after the checkpoint, before appending
        metrics.truncate_after(wd.root, start)
    writer = metrics.MetricsWriter(wd.root, is_primary=primary, total_steps=task.total_steps)
    if start == 0:
        writer.write_config(task.resolved)

    def should_stop() -> bool:
        return wd.preemption_requested

    data = task.make_data(position, should_stop=should_stop)
    key = jax.random.key(config.seed)
    peak = config.get("peak_tflops") or flops.peak_tflops()
    r = task.resolved  # every period in steps
    every = (r["checkpoint_every_steps"], r["log_every_steps"], r["keep_every_steps"])
    cadence = Cadence(task.total_steps, *every, task.periodic)
    logging.info(
        "%s: steps %d..%d on mesh %s", task.name, start, task.total_steps, dict(mesh.shape)
    )
    trace = profiler.Profiler(profile, wd.root, start, task.total_steps)
    last, d, t_last, step_last = {}, Decision(), time.perf_counter(), start
    try:
        if wd.preemption_requested:  # no step ran: exit now rather than after compiling
            print(
                f"preemption notice during start-up: exiting before step {start + 1}; the "
                f"next run starts from {f'step {start}' if start else 'the beginning'}",
                flush=True,
            )
            return last
        # ---- the steps: get batch -> step -> decide -> act
        for step in range(start, task.total_steps):
            trace.before(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                try:
                    if wd.preemption_requested:  # a notice during the last step's work
                        raise pipeline.Interrupted("stop requested")
                    with jax.profiler.TraceAnnotation("data"):
                        batch = next(data)
                        if task.check_batch is not None:
                            task.check_batch(batch)
                        arrays = {k: shd.global_batch(batch[k], mesh) for k in task.device_keys}
                except pipeline.Interrupted:
                    done, d = step, decide(step, cadence, True, waiting=True)
                else:
                    state, m = fns.step(state, arrays, key)
                    if step == start:
                        startup.stop()
                        took = startup.summary()
                        logging.info(
                            "%s: start-up compilation: %s (tracing %.2f s, lowering %.2f s)",
                            task.name,
                            compile_cache.describe(took),
                            took["trace_s"],
                            took["lower_s"],
                        )
                    done = step + 1
                    d = decide(done, cadence, wd.preempted(done))
                bad = int(jax.device_get(state["nonfinite_step"])) if d.log or d.save else -1
                if bad >= 0:
                    wd.wait()
                    where = "no checkpoint was saved yet"
                    if saved := wd.steps():
                        where = f"the last good checkpoint is step {saved[-1]} in {wd.checkpoints}"
                    raise TrainingError(f"non-finite loss at step {bad}; stopping ({where})")
                values = {}
                if d.log:  # the step's lr and norms; loss, grad_norm: means over the window
                    state, means = fns.read_window(state)
                    values = {**{k: float(v) for k, v in jax.device_get(m).items()}, **means}
                    now = time.perf_counter()
                    ips = (done - step_last) * task.batch_size / max(now - t_last, 1e-9)
                    t_last, step_last = now, done
                    values.update(images_per_sec=ips, skipped_images=data.skipped)
                    if task.flops_per_image:
                        tflops = ips * task.flops_per_image / 1e12 / jax.device_count()
                        values["tflops_per_device"] = tflops
                        if peak:
                            values["mfu"] = tflops / peak
                stop = None if d.final else should_stop  # the last step's work runs to its end
                try:
                    for work in d.periodic:
                        values.update(work(writer, state, batch, done, stop) or {})
                except pipeline.Interrupted as e:  # saved and stopped at the next step
                    logging.warning("step %d: periodic work interrupted (%s)", done, e)
                if values:
                    writer.write_scalars(done, values)
                    last = {"step": done, **values}
                if d.save:  # (unless that step is saved)
                    meta = {**task.meta(), "data_position": data.position, "seed": config.seed}
                    meta.update(
                        step=done, skipped_images=data.skipped, window=fns.window_json(state)
                    )
                    with jax.profiler.TraceAnnotation("checkpoint_save"):
                        wd.save(done, wdir.to_checkpoint(state), meta)
                if d.stop:  # the one preemption path (SIGTERM, Ctrl-C, a pod's sync point)
                    wd.wait()
                    if done in wd.steps():
                        msg = f"preemption notice: saved step {done} in {wd.checkpoints}; exiting"
                        print(msg, flush=True)
                    else:
                        logging.error("preemption notice: could not save step %d; exiting", done)
                    break
            trace.after(step, state)
    finally:
        trace.stop(state)  # a run that ends or fails inside the window
        wd.wait()
        writer.close()
        if hasattr(data, "close"):
            data.close()
    if not d.stop and primary:
        print(
            f"{task.name}: done at step {task.total_steps}. checkpoints: {wd.checkpoints}; "
            f"metrics: {wdir.join(wd.root, metrics.JSONL_NAME)}; TensorBoard: tensorboard "
            f"--logdir {wd.root}; config: {wdir.join(wd.root, wdir.CONFIG)}",
            flush=True,
        )
    return last


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
