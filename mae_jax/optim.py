"""Optimization shared by pretraining, fine-tuning and linear probing.

Pure functions over parameter pytrees: an `nnx.State` of `nnx.Param`s or any nested dict /
list whose key paths carry the official parameter names (`('blocks', 3, 'attn', 'qkv',
'kernel')`, `('cls_token',)`, ...). Per-parameter decisions (weight-decay mask, layer id) are
taken from the key path and the leaf's `ndim` at trace time, so every transformation here works
on any tree with those names, under `jax.jit`, with sharded arrays, and never leaves the device.

Semantics follow the official MAE release (facebookresearch/mae):
  * lr per step `t` (0-based, the lr used for the update at step `t`):
      `t < warmup`: `lr * t / warmup`;
      else: `min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (t - warmup) / (total - warmup)))`,
      held at `min_lr` past `total`.
  * lr = base_lr * global_batch / 256 unless an absolute lr is given.
  * AdamW (decoupled decay, PyTorch semantics) with no decay on ndim <= 1 params (biases, norm
    scales) and on names listed in `no_decay_names`.
  * Layer-wise lr decay (fine-tuning): the group lr `lr * scale` applies to the whole update,
    Adam step and weight decay alike.
  * LARS as util/lars.py: trust ratio and weight decay on ndim > 1 params only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mae_jax import schema
from mae_jax.spec import require

PyTree = Any

# ----------------------------------------------------------------------------- key paths


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """Key path from `tree_flatten_with_path` -> plain names, e.g. ('blocks', '0', 'fc1', 'kernel').

    DictKey -> str(key), SequenceKey -> str(idx), GetAttrKey -> name, FlattenedIndexKey -> str(key).
    A trailing `.value` (the array inside an `nnx.Variable`) is dropped.
    """
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(str(k.name))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names.pop()
    return tuple(names)


def _matches(names: tuple[str, ...], patterns: Sequence[str]) -> bool:
    """True if a pattern equals the dotted path, one of its names, or a dotted prefix of it."""
    dotted = ".".join(names)
    for pat in patterns:
        if pat == dotted or pat in names or dotted.startswith(pat + "."):
            return True
    return False


def _map_with_names(fn: Callable[[tuple[str, ...], Any], Any], tree: PyTree, *rest: PyTree):
    return jax.tree_util.tree_map_with_path(lambda p, x, *r: fn(path_names(p), x, *r), tree, *rest)


# ----------------------------------------------------------------------------- schedules


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """A warm-up + half-cosine learning-rate schedule whose numbers are data: a pytree of float32
    arrays, passed to the train step as an argument, so one compiled step serves every run
    length and extension. `schedule(step)` (int scalar, traced or not) -> float32 lr.

    Base: `t < warmup`: `peak * t / max(warmup, 1)`; then `floor + half * (1 + cos(pi * frac))`
    with `half = (peak - floor) / 2`, `frac = clip((t - warmup) / max(total - warmup, 1), 0, 1)`
    (1 from `total` on). Each extension `i` (`starts`, `halves`, `lengths`: `[k]`) continues from its
    start with `floor + halves[i] * (1 + cos(pi * clip((t - starts[i]) / lengths[i], 0, 1)))`.
    """

    peak: Any
    floor: Any
    half: Any
    warmup: Any
    total: Any
    starts: Any
    halves: Any
    lengths: Any

    def __call__(self, step):
        t = jnp.asarray(step, jnp.float32)
        warm_lr = self.peak * t / jnp.maximum(self.warmup, 1.0)
        decay_len = jnp.maximum(self.total - self.warmup, 1.0)  # whole numbers: exact in f32
        frac = jnp.where(t >= self.total, 1.0, jnp.clip((t - self.warmup) / decay_len, 0.0, 1.0))
        lr = jnp.where(
            t < self.warmup, warm_lr, self.floor + self.half * (1.0 + jnp.cos(jnp.pi * frac))
        )
        for i in range(np.shape(self.starts)[0]):
            frac = jnp.clip((t - self.starts[i]) / self.lengths[i], 0.0, 1.0)
            after = self.floor + self.halves[i] * (1.0 + jnp.cos(jnp.pi * frac))
            lr = jnp.where(t < self.starts[i], lr, after)
        return lr.astype(jnp.float32)


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def warmup_cosine_schedule(
    peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> Schedule:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then half-cosine to `min_lr`: the
    official MAE per-iteration formula. Steps >= `total_steps` return `min_lr`."""
    return extended_schedule(peak_lr, total_steps, warmup_steps, min_lr)


def extended_schedule(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    min_lr: float = 0.0,
    extensions: Sequence[Sequence[int]] = (),
) -> Schedule:
    """The warm-up + cosine schedule of a run whose length was changed while it ran.

    `extensions`: `(from_step, previous_total)` pairs, oldest first: at `from_step` the run,
    then planned for `previous_total` steps, was extended (to the next pair's total, the last one
    to `total_steps`). Up to `from_step` the schedule is the one followed; from there the lr it
    had reached decays by the same half-cosine to `min_lr` at the new total, so the lr never
    jumps. An extension during warm-up keeps the warm-up and stretches the cosine.
    """
    for name, value, spec in (
        ("peak_lr", peak_lr, "num>=0"),
        ("min_lr", min_lr, "num>=0"),
        ("total_steps", total_steps, "int>=1"),
        ("warmup_steps", warmup_steps, "int>=0"),
    ):
        require(name, value, spec)
    pairs = [(int(s), int(t)) for s, t in extensions]
    totals = [t for _, t in pairs] + [total_steps]
    bases, continued = [totals[0]], []  # the base cosine's totals; (start, total) continued
    for (start, _), new_total in zip(pairs, totals[1:], strict=True):
        if new_total < start:
            raise ValueError(f"an extension at step {start} to {new_total} steps ends before it")
        if start < warmup_steps:  # still warming up: the warm-up stays, the cosine stretches
            bases, continued = [*bases, new_total], []
        else:
            continued.append((start, new_total))
    if warmup_steps > min(bases):
        raise ValueError(f"warmup_steps={warmup_steps} must be <= total_steps={min(bases)}")
    base_total = bases[-1]
    peak, floor = float(peak_lr), float(min_lr)
    schedule = Schedule(
        peak=_f32(peak),
        floor=_f32(floor),
        half=_f32((peak - floor) * 0.5),
        warmup=_f32(warmup_steps),
        total=_f32(base_total),
        starts=np.zeros(0, np.float32),
        halves=np.zeros(0, np.float32),
        lengths=np.zeros(0, np.float32),
    )
    for start, total in continued:  # each continues from the lr the previous one reached
        value = float(schedule(start))
        schedule = dataclasses.replace(
            schedule,
            starts=np.append(schedule.starts, _f32(start)),
            halves=np.append(schedule.halves, _f32((value - floor) * 0.5)),
            lengths=np.append(schedule.lengths, _f32(max(total - start, 1))),
        )
    return schedule


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """The linear scaling rule: `base_lr * global_batch_size / 256`."""
    require("base_lr", base_lr, "num>=0")
    require("global_batch_size", global_batch_size, "int>=1")
    return float(base_lr) * global_batch_size / 256.0


# ----------------------------------------------------------------------------- per-param rules


def stacked_layers(names: tuple[str, ...]) -> bool:
    """Whether the parameter at `names` holds stacked blocks (`scan_layers`: `blocks.attn...`
    with the blocks along its leading axis) rather than one block's (`blocks.3.attn...`)."""
    for i, name in enumerate(names[:-1]):
        if name in ("blocks", "decoder_blocks"):
            return not names[i + 1].isdigit()
    return False


def param_ndim(names: tuple[str, ...], leaf: Any) -> int:
    """The ndim of one block's parameter: the leaf's, less the layers axis when stacked."""
    return jnp.ndim(leaf) - int(stacked_layers(names))


def _decays(names: tuple[str, ...], leaf: Any, exclude: Sequence[str]) -> bool:
    return param_ndim(names, leaf) > 1 and not _matches(names, exclude)


def weight_decay_mask(params: PyTree, exclude: Sequence[str] = ()) -> PyTree:
    """Tree of Python bools: True where weight decay applies (ndim > 1 and name not excluded).

    `exclude` entries match a full dotted path ('blocks.0.attn.qkv.kernel'), any single name
    ('cls_token', 'pos_embed') or a dotted prefix ('blocks.0').
    """
    exclude = _as_names("exclude", exclude)
    return _map_with_names(lambda n, x: bool(_decays(n, x, exclude)), params)


def _layer_id(names: tuple[str, ...], num_layers: int, leaf: Any = None) -> Any:
    """The layer id of a parameter; for stacked blocks, an int array `[depth]` (block i: i+1)."""
    for i, name in enumerate(names):
        if name in ("cls_token", "pos_embed", "patch_embed"):
            return 0
        if name == "blocks" and i + 1 < len(names):
            if stacked_layers(names):
                depth = int(jnp.shape(leaf)[0])
                if depth > num_layers:
                    raise ValueError(
                        f"parameter {'.'.join(names)} stacks {depth} blocks, but num_layers="
                        f"{num_layers}"
                    )
                return np.arange(1, depth + 1)
            block = int(names[i + 1])
            if not 0 <= block < num_layers:
                raise ValueError(
                    f"parameter {'.'.join(names)} is in block {block}, but num_layers="
                    f"{num_layers}; expected block indices in [0, {num_layers})"
                )
            return block + 1
    return num_layers + 1


def layer_ids(params: PyTree, num_layers: int) -> PyTree:
    """Tree of int layer ids, the official MAE fine-tuning rule (util/lr_decay.py).

    cls_token, pos_embed, patch_embed.* -> 0; blocks.i.* -> i + 1; everything else -> num_layers+1.
    Stacked blocks (`blocks.attn...`, `[depth, ...]`) get the array `[1, ..., depth]`.
    """
    require("num_layers", num_layers, "int>=0")
    return _map_with_names(lambda n, x: _layer_id(n, num_layers, x), params)


def _lr_scale(names: tuple[str, ...], leaf: Any, num_layers: int, decay: float) -> Any:
    """`decay ** (num_layers + 1 - layer_id)`: a float, or for stacked blocks an array shaped
    `[depth, 1, ...]` to broadcast against the leaf."""
    scale = float(decay) ** (num_layers + 1 - _layer_id(names, num_layers, leaf))
    if isinstance(scale, np.ndarray):
        return scale.reshape((-1,) + (1,) * (jnp.ndim(leaf) - 1))
    return scale


def layerwise_lr_scales(params: PyTree, num_layers: int, decay: float) -> PyTree:
    """Tree of lr scales `decay ** (num_layers + 1 - layer_id)` (head 1.0, patch_embed least):
    floats, and `[depth, 1, ...]` arrays for stacked blocks."""
    require("num_layers", num_layers, "int>=0")
    require("layer_decay", decay, "num(0,1]")
    return _map_with_names(lambda n, x: _lr_scale(n, x, num_layers, decay), params)


def _as_names(what: str, names: Any) -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, str):
        raise ValueError(f"{what} must be a sequence of names, not the string {names!r}")
    out = tuple(names)
    for n in out:
        if not isinstance(n, str):
            raise ValueError(f"{what} must contain names (str), got {n!r} in {names!r}")
    return out


# ----------------------------------------------------------------------------- transformations


def add_masked_decayed_weights(
    weight_decay: float, exclude: Sequence[str] = ()
) -> optax.GradientTransformation:
    """update + weight_decay * param, only where `weight_decay_mask(params, exclude)` is True."""
    exclude = _as_names("exclude", exclude)
    wd = float(weight_decay)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_masked_decayed_weights needs params in update(), got None")
        if wd == 0.0:
            return updates, state

        def f(names, u, p):
            if _decays(names, p, exclude):
                return u + jnp.asarray(wd, u.dtype) * p.astype(u.dtype)
            return u

        return _map_with_names(f, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_layer_decay(num_layers: int, decay: float) -> optax.GradientTransformation:
    """Multiply each update by its `layerwise_lr_scales` entry (chosen from its key path)."""
    require("num_layers", num_layers, "int>=0")
    require("layer_decay", decay, "num(0,1]")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params

        def f(names, u):
            return u * jnp.asarray(_lr_scale(names, u, num_layers, decay), u.dtype)

        return _map_with_names(f, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_lars(
    weight_decay: float = 0.0, trust_coefficient: float = 0.001
) -> optax.GradientTransformation:
    """The LARS rescaling of util/lars.py, before momentum. For ndim > 1 params only:
    g <- g + wd * p; g <- g * (trust * |p| / |g|) (ratio 1 when |p| or |g| is 0).
    ndim <= 1 params pass through unchanged. Stacked blocks: per block (norms per layer)."""
    wd, trust = float(weight_decay), float(trust_coefficient)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_lars needs params in update(), got None")

        def f(names, u, p):
            if param_ndim(names, p) <= 1:
                return u
            p32, u32 = p.astype(jnp.float32), u.astype(jnp.float32)
            u32 = u32 + wd * p32
            axes = tuple(range(int(stacked_layers(names)), p.ndim))  # all but the layers axis
            p_norm = jnp.sqrt(jnp.sum(p32 * p32, axis=axes, keepdims=True))
            u_norm = jnp.sqrt(jnp.sum(u32 * u32, axis=axes, keepdims=True))
            safe_u = jnp.where(u_norm > 0, u_norm, 1.0)
            ratio = jnp.where((p_norm > 0) & (u_norm > 0), trust * p_norm / safe_u, 1.0)
            return (u32 * ratio).astype(u.dtype)

        return _map_with_names(f, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def lars(
    learning_rate: float | optax.Schedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
) -> optax.GradientTransformation:
    """The official MAE LARS (util/lars.py) as an optax transformation.

    ndim > 1: g <- g + wd*p; g <- g * trust*|p|/|g| (1 if a norm is 0); mu <- momentum*mu + g;
    p <- p - lr*mu. ndim <= 1: mu <- momentum*mu + g; p <- p - lr*mu.
    """
    return optax.chain(
        scale_by_lars(weight_decay, trust_coefficient),
        optax.trace(decay=float(momentum), nesterov=False),
        optax.scale_by_learning_rate(learning_rate),
    )


# ----------------------------------------------------------------------------- config


def peak_learning_rate(optim_config, batch_size: int | None = None) -> float:
    """`lr` when set, else `base_lr * batch_size / 256`."""
    if optim_config.get("lr") is not None:
        return float(optim_config.lr)
    return scaled_lr(optim_config.base_lr, batch_size)


def create_optimizer(
    optim_config: ml_collections.ConfigDict,
    learning_rate: float | optax.Schedule,
    params: PyTree | None = None,
) -> optax.GradientTransformation:
    """Builds the optimizer of `optim_config` (keys of `schema.OPTIM`, checked against it;
    missing ones take their defaults) at `learning_rate` (a float or a schedule, e.g. the
    run's `train.Plan.lr_fn`).

    Chain: [global-norm clip] -> direction (adam | lars rescale + momentum | wd + momentum)
    -> [layer-wise lr scale, applied to the whole update incl. decay] -> -lr(step).
    adamw: decoupled decay on `weight_decay_mask(params, no_decay_names)`.
    lars: decay and trust ratio on ndim > 1 params (the official rule; no_decay_names unused).
    sgd: PyTorch SGD (g + wd*p, masked like adamw, then momentum).
    `params` (optional) is checked against the config (e.g. block indices vs num_layers).
    """
    schema.check(optim_config, schema.OPTIM, "optim")
    c = schema.defaults(schema.OPTIM)
    c.update(dict(optim_config.items()))
    name, clip, layer_decay, num_layers = c.name, c.grad_clip_norm, c.layer_decay, c.num_layers
    no_decay = tuple(c.no_decay_names)
    if layer_decay is not None:
        if num_layers is None:
            raise ValueError(
                f"layer_decay={layer_decay} needs num_layers (the encoder depth), got None"
            )
        if params is not None:
            layer_ids(params, num_layers)  # raises on block indices >= num_layers

    parts = []
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    wd = float(c.weight_decay)
    if name == "adamw":
        parts += [
            optax.scale_by_adam(b1=float(c.b1), b2=float(c.b2), eps=float(c.eps)),
            add_masked_decayed_weights(wd, no_decay),
        ]
    elif name == "lars":
        parts += [
            scale_by_lars(wd, float(c.trust_coefficient)),
            optax.trace(decay=float(c.momentum)),
        ]
    else:  # sgd
        parts += [add_masked_decayed_weights(wd, no_decay), optax.trace(decay=float(c.momentum))]
    if layer_decay is not None:
        parts.append(scale_by_layer_decay(num_layers, float(layer_decay)))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
