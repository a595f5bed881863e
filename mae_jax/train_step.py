"""The one train-step builder: abstract state, shardings and the jitted programs of a task.

Every task (MAE pretraining, linear probing, fine-tuning), the benchmark and the AOT memory
check go through `build`; nothing else calls `jax.jit` on a train step. `StepFns.jit_step` is the
`jax.jit` object itself, so `.lower(...)` / `.compile()` act on the exact program that trains.

The train state is a dict: the model's split parts (`params`, the trainable `nnx.Param`s, plus
task-specific entries such as `frozen` or `batch_stats`), `opt_state`, `step` (int32, updates
done), `nonfinite_step` (int32; the first step whose loss was not finite, -1 if none) and
`window` (`{'sum': {name: float32}, 'count': int32}`: metrics summed since the loop last logged,
`StepFns.read_window`; saved in the checkpoint's meta: a resumed run logs the means an
uninterrupted one does). The
model's graph and its remaining variables (`rest`: fixed position tables, RNG streams) are kept
apart and passed to every call. Every entry is sharded by its variables' `logical_axes`
(`mae_jax.sharding.state_shardings`); batches are sharded over the batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mae_jax import sharding as shd

# step_fn(state, batch, key, *, graphdef, rest, tx, lr_fn) -> (state, metrics): a pure train step.
StepFn = Callable[..., tuple[dict, dict]]
# eval_fn(state, batch, *, graphdef, rest) -> sums: a pure evaluation step.
EvalFn = Callable[..., dict]
# split(model) -> (graphdef, parts: {'params': State, ...}, rest: State)
Split = Callable[[Any], tuple[Any, dict, Any]]


def split_params(model) -> tuple[Any, dict, Any]:
    """`model` -> `(graphdef, {'params': trainable nnx.Params}, rest)`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, {"params": params}, rest


MEAN_METRICS = ("loss", "grad_norm")  # logged as window means; lr, param_norm: of the step


def init_state(parts: dict, tx: optax.GradientTransformation | None, means=MEAN_METRICS) -> dict:
    """The train state of the model `parts` (no `opt_state` and `window` without an optimizer
    `tx`); the window sums the metrics named in `means`."""
    window = {"sum": {k: jnp.zeros((), jnp.float32) for k in means}, "count": jnp.int32(0)}
    opt = {} if tx is None else {"opt_state": tx.init(parts["params"]), "window": window}
    return {
        **parts,
        **opt,
        "step": jnp.zeros((), jnp.int32),
        "nonfinite_step": jnp.full((), -1, jnp.int32),
    }


def apply_gradients(
    state: dict, loss, grads, tx: optax.GradientTransformation, lr_fn, **updates
) -> tuple[dict, dict]:
    """One optimizer update of `state['params']` with `grads`; `updates` replace other entries
    (e.g. `batch_stats`). Returns the new state and the metrics every task logs."""
    step = state["step"]
    deltas, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], deltas)
    # Steps are counted from 1 in logs and checkpoints: this update is step `step + 1`.
    nonfinite = jnp.where(
        (state["nonfinite_step"] < 0) & ~jnp.isfinite(loss), step + 1, state["nonfinite_step"]
    )
    new_state = {
        **state,
        **updates,
        "params": params,
        "opt_state": opt_state,
        "step": step + 1,
        "nonfinite_step": nonfinite,
    }
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": lr_fn(step),
        "param_norm": optax.tree.norm(params),
    }
    return new_state, metrics


@dataclasses.dataclass
class StepFns:
    """The jitted programs of one model / optimizer / mesh, and what they run on.

    `jit_step(state, batch, key, rest, schedule) -> (state, metrics)`: the train step (`jax.jit`
    object; state donated; None in an evaluation-only build); the metrics are the step's own, the
    `means` also added to the state's `window`; `schedule` (`optim.Schedule`, the learning rate)
    is an argument, so the program does not depend on the run's length.
    `jit_init() -> (state, rest)`: a fresh state.
    `jit_eval(state, batch, rest) -> sums` when the task evaluates. `batch` is a dict of global
    arrays with `batch_keys`. `rest` comes with a fresh state (`init`) or is built on first use (a
    restored run): lowering for compile-only devices executes nothing, and a fresh run traces
    the model once for both.
    """

    jit_step: Any
    jit_eval: Any  # None when the task does not evaluate
    jit_rest: Any
    jit_init: Any
    graphdef: Any
    abstract_state: Any
    state_shardings: Any
    abstract_rest: Any
    rest_shardings: Any
    batch_shardings: dict
    replicated: Any
    schedule: Any  # optim.Schedule (host arrays), None in an evaluation-only build
    _rest: Any = dataclasses.field(default=None, init=False, repr=False)

    @property
    def rest(self):
        if self._rest is None:
            self._rest = self.jit_rest()
        return self._rest

    def init(self) -> dict:
        state, self._rest = self.jit_init()  # the same tables as `jit_rest` builds
        return state

    def step(self, state: dict, batch: dict, key: jax.Array) -> tuple[dict, dict]:
        return self.jit_step(state, batch, key, self.rest, self.schedule)

    def evaluate(self, state: dict, batch: dict) -> dict:
        return self.jit_eval(state, batch, self.rest)

    def read_window(self, state: dict) -> tuple[dict, dict]:
        """`(state with an empty window, {name: mean over the window's steps})` (a host read)."""
        window = self.window_json(state)
        means = {k: v / max(window["count"], 1) for k, v in window["sum"].items()}
        return self.set_window(state, None), means

    def window_json(self, state: dict) -> dict:
        """The state's window as JSON numbers (exact: float32 sums as Python floats)."""
        return jax.tree.map(lambda x: x.item(), jax.device_get(state["window"]))

    def set_window(self, state: dict, window: dict | None) -> dict:
        """`state` with the window `window` (`window_json`'s form; None: empty)."""
        abstract = self.abstract_state["window"]
        values = jax.tree.map(lambda a: 0, abstract) if window is None else window
        host = jax.tree.map(lambda a, v: np.asarray(v, a.dtype), abstract, values)
        return {**state, "window": jax.device_put(host, self.state_shardings["window"])}

    def abstract_args(self, batch_shapes: dict[str, tuple[tuple[int, ...], Any]]) -> tuple:
        """`jit_step`'s arguments as ShapeDtypeStructs with their shardings, for `.lower()`:
        `batch_shapes` maps each batch key to `(shape, dtype)`."""

        def sds(a, s):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

        batch = {
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_shardings[k])
            for k, (shape, dtype) in batch_shapes.items()
        }
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=self.replicated)
        return (
            jax.tree.map(sds, self.abstract_state, self.state_shardings),
            batch,
            key,
            jax.tree.map(sds, self.abstract_rest, self.rest_shardings),
            jax.tree.map(lambda x: sds(np.asarray(x), self.replicated), self.schedule),
        )


def build(
    model_fn: Callable[[], Any],
    make_tx: Callable[[Any], optax.GradientTransformation] | None,
    schedule: Any,
    mesh: Mesh,
    *,
    step_fn: StepFn | None,
    split: Split = split_params,
    batch_keys: Sequence[str] = ("image",),
    eval_fn: EvalFn | None = None,
    eval_keys: Sequence[str] = (),
    rules=shd.DEFAULT_RULES,
    means: Sequence[str] = MEAN_METRICS,
) -> StepFns:
    """Abstract state, shardings and the jitted init / train (/ eval) programs of `model_fn`'s
    model under the optimizer `make_tx(schedule)` (`schedule`: an `optim.Schedule`, the step's
    `lr_fn`) on `mesh`. Nothing is executed or compiled here. An evaluation-only build
    (`step_fn`, `make_tx` and `schedule` None, `eval_fn` given) has no train step and no
    optimizer state.
    `means`: the metrics of `step_fn` logged as window means."""
    if step_fn is None and eval_fn is None:
        raise ValueError("train_step.build needs a step_fn, an eval_fn or both")
    abstract_model = nnx.eval_shape(model_fn)
    graphdef, abstract_parts, abstract_rest = split(abstract_model)
    tx = None if make_tx is None else make_tx(schedule)  # the state's layout only
    init = functools.partial(init_state, tx=tx, means=means)
    abstract_state = jax.eval_shape(init, abstract_parts)
    state_sh = shd.state_shardings(abstract_state, mesh, rules)
    rest_sh = shd.state_shardings(abstract_rest, mesh, rules)
    rep = shd.replicated(mesh)
    batch_sh = {k: shd.batch_sharding(mesh) for k in (*batch_keys, *eval_keys)}

    def train(state, batch, key, rest, lr_fn):
        tx = make_tx(lr_fn)  # the schedule's numbers are traced: any run length, one program
        state, metrics = step_fn(
            state, batch, key, graphdef=graphdef, rest=rest, tx=tx, lr_fn=lr_fn
        )
        w = state["window"]
        total = {k: v + metrics[k].astype(jnp.float32) for k, v in w["sum"].items()}
        return {**state, "window": {"sum": total, "count": w["count"] + 1}}, metrics

    def fresh():
        _, parts, rest = split(model_fn())
        return init(parts), rest

    jit_step = None
    if step_fn is not None:
        jit_step = jax.jit(
            train,
            in_shardings=(state_sh, {k: batch_sh[k] for k in batch_keys}, rep, rest_sh, rep),
            out_shardings=(state_sh, rep),
            donate_argnums=(0,),
        )
    jit_eval = None
    if eval_fn is not None:
        jit_eval = jax.jit(
            lambda state, batch, rest: eval_fn(state, batch, graphdef=graphdef, rest=rest),
            in_shardings=(state_sh, {k: batch_sh[k] for k in eval_keys}, rest_sh),
            out_shardings=rep,
        )
    return StepFns(
        jit_step=jit_step,
        jit_eval=jit_eval,
        # The non-trainable variables are deterministic tables: built with a fresh state, or on
        # first use when the state is restored.
        jit_rest=jax.jit(lambda: split(model_fn())[2], out_shardings=rest_sh),
        jit_init=jax.jit(fresh, out_shardings=(state_sh, rest_sh)),
        graphdef=graphdef,
        abstract_state=abstract_state,
        state_shardings=state_sh,
        abstract_rest=abstract_rest,
        rest_shardings=rest_sh,
        batch_shardings=batch_sh,
        replicated=rep,
        schedule=schedule,
    )
