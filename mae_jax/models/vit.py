"""Flax NNX building blocks shared by every model: PatchEmbed, Attention, Mlp, Block.

Tokens are `[N, T, D]`. Parameter names mirror the official PyTorch/timm release
(`patch_embed.proj`, `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, `norm1`, `norm2`) so the
converter is a rename plus transposes. Every parameter carries a `logical_axes` metadata tuple
that `mae_jax.sharding` maps to mesh axes; the modules themselves know nothing of meshes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-6  # LayerNorm epsilon of the official release


class FixedEmbedding(nnx.Variable):
    """A non-trainable embedding table (the fixed sin-cos position embeddings).

    Not an `nnx.Param`: it is never differentiated, decayed or updated by the optimizer.
    """


def xavier_uniform(axes: tuple[str | None, ...]):
    return nnx.with_metadata(nnx.initializers.xavier_uniform(), logical_axes=axes)


def zeros(axes: tuple[str | None, ...]):
    return nnx.with_metadata(nnx.initializers.zeros_init(), logical_axes=axes)


def ones(axes: tuple[str | None, ...]):
    return nnx.with_metadata(nnx.initializers.ones_init(), logical_axes=axes)


def normal(std: float, axes: tuple[str | None, ...]):
    return nnx.with_metadata(nnx.initializers.normal(std), logical_axes=axes)


def uniform_fan_in(fan_in: int, axes: tuple[str | None, ...]):
    """PyTorch's default Conv2d/Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.with_metadata(init, logical_axes=axes)


def linear(
    d_in: int,
    d_out: int,
    axes: tuple[str | None, str | None],
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """Linear with the official init: xavier-uniform kernel `[in, out]`, zero bias."""
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=xavier_uniform(axes),
        bias_init=zeros((axes[1],)),
        rngs=rngs,
    )


def layer_norm(dim: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with eps 1e-6; statistics in float32 with the exact (two-pass) variance."""
    return nnx.LayerNorm(
        dim,
        epsilon=LN_EPS,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=ones(("embed",)),
        bias_init=zeros(("embed",)),
        rngs=rngs,
    )


class PatchEmbed(nnx.Module):
    """Linear embedding of patch vectors `[N, L, p*p*C]` -> `[N, L, D]`.

    Equal to the official stride-p Conv2d: `proj.kernel [p*p*C, D]` is the conv weight
    `[D, C, p, p]` permuted to (p, p, C, D) and flattened. Working on patch vectors lets the
    encoder embed only the visible patches.
    """

    def __init__(self, patch_dim: int, embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = nnx.Linear(
            patch_dim,
            embed_dim,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=xavier_uniform((None, "embed")),
            bias_init=uniform_fan_in(patch_dim, ("embed",)),
            rngs=rngs,
        )

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.proj(patches)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused `qkv` projection (rows q, k, v; heads contiguous).

    `implementation` is passed to `jax.nn.dot_product_attention` (None = XLA's choice,
    'xla', or 'cudnn').
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        dtype,
        param_dtype,
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.implementation = implementation
        self.qkv = linear(
            dim, 3 * dim, ("embed", "qkv"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.proj = linear(
            dim, dim, ("heads", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(n, t, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, H, Dh]
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        return self.proj(out.reshape(n, t, d))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = linear(
            dim, hidden, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.fc2 = linear(
            hidden, dim, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class DropPath(nnx.Module):
    """Stochastic depth per sample (`rate` = probability of dropping the residual branch)."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs | None = None):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.deterministic = False
        self.rngs = rngs.fork() if (rngs is not None and rate > 0) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.rate == 0.0 or self.deterministic:
            return x
        if self.rngs is None:
            raise ValueError("DropPath with rate > 0 needs rngs to train")
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        draw = jax.random.bernoulli(self.rngs.dropout(), keep, shape)
        return x * draw.astype(x.dtype) / keep


class Block(nnx.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        dtype,
        param_dtype,
        attention_impl: str | None = None,
        drop_path: float = 0.0,
        rngs: nnx.Rngs,
    ):
        kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, **kw)
        self.attn = Attention(dim, num_heads, implementation=attention_impl, **kw)
        self.norm2 = layer_norm(dim, **kw)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs) if drop_path > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dp = self.drop_path if self.drop_path is not None else (lambda y: y)
        x = x + dp(self.attn(self.norm1(x)))
        return x + dp(self.mlp(self.norm2(x)))


def _call_block(block: Block, x: jax.Array) -> jax.Array:
    return block(x)


_remat_call_block = nnx.remat(_call_block)


def run_blocks(blocks, x: jax.Array, remat: bool = False) -> jax.Array:
    """Apply a sequence of blocks; with `remat`, each block's activations are recomputed in
    the backward pass instead of stored."""
    call = _remat_call_block if remat else _call_block
    for block in blocks:
        x = call(block, x)
    return x
