"""The train state and the pure, sharded MAE pretraining step.

The state is a pytree `{'params': nnx.State, 'opt_state': optax state, 'step': int32,
'nonfinite_step': int32}`; the model's graph and its non-trainable variables (the fixed position
embeddings) are passed separately. The step is a pure function jitted with explicit in/out
shardings and a donated state; masking noise is drawn on device from `fold_in(key, step)`, so
a run is reproducible from `(seed, step)` alone and no host round-trip happens inside the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax import sharding as shd
from mae_jax.models import MAE


@dataclasses.dataclass(frozen=True)
class StepFns:
    """Compiled entry points for one model/optimizer/mesh."""

    init: Callable[[], Any]  # () -> state, sharded
    step: Callable[[Any, dict, jax.Array], tuple[Any, dict]]  # (state, {'image': ...}, key)
    state_shardings: Any
    abstract_state: Any
    graphdef: Any
    rest: Any  # non-trainable variables (pos embeds, rng)


def split_model(model: MAE):
    """`model` -> `(graphdef, params, rest)` with `params` the trainable `nnx.Param`s."""
    return nnx.split(model, nnx.Param, ...)


def init_state(params, tx: optax.GradientTransformation) -> dict:
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "nonfinite_step": jnp.full((), -1, jnp.int32),
    }


def _loss(graphdef, rest, params, images, noise):
    return nnx.merge(graphdef, params, rest)(images, noise=noise).loss


def compute_grads(graphdef, rest, params, images, noise, accum_steps: int, mesh: Mesh | None):
    """Mean loss and gradients over the batch, in `accum_steps` sequential micro-batches.

    All samples mask the same number of patches, so the mean of the micro-batch losses
    (and gradients) equals the full-batch loss (and gradient).
    """
    grad_fn = jax.value_and_grad(lambda p, x, z: _loss(graphdef, rest, p, x, z))
    if accum_steps == 1:
        return grad_fn(params, images, noise)
    n = images.shape[0]
    micro = n // accum_steps

    def split(x):
        x = x.reshape((accum_steps, micro) + x.shape[1:])
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, shd.BATCH_AXES)))
        return x

    def body(carry, xs):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, *xs)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), (split(images), split(noise))
    )
    return loss_sum / accum_steps, jax.tree.map(lambda g: g / accum_steps, grad_sum)


def train_step(
    state: dict,
    images: jax.Array,
    key: jax.Array,
    *,
    graphdef,
    rest,
    tx: optax.GradientTransformation,
    lr_fn,
    num_patches: int,
    accum_steps: int = 1,
    mesh: Mesh | None = None,
) -> tuple[dict, dict]:
    """One optimizer update on the global batch `images [B, H, W, C]` (normalized NHWC)."""
    step = state["step"]
    noise = jax.random.uniform(
        jax.random.fold_in(key, step), (images.shape[0], num_patches), jnp.float32
    )
    if mesh is not None:
        noise = jax.lax.with_sharding_constraint(noise, shd.batch_sharding(mesh))
    loss, grads = compute_grads(graphdef, rest, state["params"], images, noise, accum_steps, mesh)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss)
    # Steps are counted from 1 in logs and checkpoints: this update is step `step + 1`.
    nonfinite_step = jnp.where(
        (state["nonfinite_step"] < 0) & ~finite, step + 1, state["nonfinite_step"]
    )
    new_state = {
        "params": params,
        "opt_state": opt_state,
        "step": step + 1,
        "nonfinite_step": nonfinite_step,
    }
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": lr_fn(step),
        "param_norm": optax.tree.norm(params),
    }
    return new_state, metrics


def build(
    model_fn: Callable[[], MAE],
    tx: optax.GradientTransformation,
    lr_fn,
    mesh: Mesh,
    *,
    accum_steps: int = 1,
    rules=shd.DEFAULT_RULES,
) -> StepFns:
    """Abstract state, shardings and jitted init/step functions for `model_fn`'s model."""
    abstract_model = nnx.eval_shape(model_fn)
    graphdef, abstract_params, abstract_rest = split_model(abstract_model)
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
    state_sh = shd.state_shardings(abstract_state, mesh, rules)
    rest_sh = shd.state_shardings(abstract_rest, mesh, rules)
    # The non-trainable variables are deterministic tables: build them once, replicated.
    rest = jax.jit(lambda: split_model(model_fn())[2], out_shardings=rest_sh)()

    def init():
        return init_state(split_model(model_fn())[1], tx)

    init_jit = jax.jit(init, out_shardings=state_sh)
    num_patches = abstract_model.config.num_patches
    step_fn = jax.jit(
        lambda state, images, key, rest: train_step(
            state,
            images,
            key,
            graphdef=graphdef,
            rest=rest,
            tx=tx,
            lr_fn=lr_fn,
            num_patches=num_patches,
            accum_steps=accum_steps,
            mesh=mesh,
        ),
        in_shardings=(state_sh, shd.batch_sharding(mesh), shd.replicated(mesh), rest_sh),
        out_shardings=(state_sh, shd.replicated(mesh)),
        donate_argnums=(0,),
    )
    return StepFns(
        init=init_jit,
        step=lambda s, batch, k: step_fn(s, batch["image"], k, rest),
        state_shardings=state_sh,
        abstract_state=abstract_state,
        graphdef=graphdef,
        rest=rest,
    )
