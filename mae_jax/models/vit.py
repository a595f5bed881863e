"""Flax NNX building blocks shared by every model: PatchEmbed, Attention, Mlp, Block.

Tokens are `[N, T, D]`. Parameter names mirror the official PyTorch/timm release
(`patch_embed.proj`, `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, `norm1`, `norm2`) so the
converter is a rename plus transposes. Every parameter carries a `logical_axes` metadata tuple
that `mae_jax.sharding` maps to mesh axes; the modules themselves know nothing of meshes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

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


def normal(std: float, axes: tuple[str | None, ...]):
    return nnx.with_metadata(nnx.initializers.normal(std), logical_axes=axes)


def uniform_fan_in(fan_in: int, axes: tuple[str | None, ...]):
    """PyTorch's default Conv2d/Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.with_metadata(init, logical_axes=axes)


# `kw` below: the `dtype`, `param_dtype` and `rngs` of every nnx layer.
def linear(d_in: int, d_out: int, axes: tuple[str | None, str | None], **kw) -> nnx.Linear:
    """Linear with the official init: xavier-uniform kernel `[in, out]`, zero bias."""
    return nnx.Linear(
        d_in, d_out, kernel_init=xavier_uniform(axes), bias_init=zeros((axes[1],)), **kw
    )


def layer_norm(dim: int, **kw) -> nnx.LayerNorm:
    """LayerNorm with eps 1e-6; statistics in float32 with the exact (two-pass) variance."""
    axes = ("embed",)
    ones = nnx.with_metadata(nnx.initializers.ones_init(), logical_axes=axes)
    return nnx.LayerNorm(
        dim, epsilon=LN_EPS, use_fast_variance=False, scale_init=ones, bias_init=zeros(axes), **kw
    )


class PatchEmbed(nnx.Module):
    """Linear embedding of patch vectors `[N, L, p*p*C]` -> `[N, L, D]`.

    Equal to the official stride-p Conv2d: `proj.kernel [p*p*C, D]` is the conv weight
    `[D, C, p, p]` permuted to (p, p, C, D) and flattened. Working on patch vectors lets the
    encoder embed only the visible patches.
    """

    def __init__(self, patch_dim: int, embed_dim: int, **kw):
        kernel_init = xavier_uniform((None, "embed"))
        bias_init = uniform_fan_in(patch_dim, ("embed",))
        self.proj = nnx.Linear(
            patch_dim, embed_dim, kernel_init=kernel_init, bias_init=bias_init, **kw
        )

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.proj(patches)


# cuDNN's fused (flash) attention refuses the token counts of the MAE (50 visible + cls in the
# encoder, 197 in the decoder); padded to a multiple of this, with the padded keys masked, it runs.
CUDNN_SEQ_MULTIPLE = 64
_HALF_DTYPES = (jnp.bfloat16, jnp.float16)
_cudnn_refused: list[str] = []  # why the automatic choice fell back to XLA (warned once)


def padded_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, multiple: int, implementation: str
) -> jax.Array:
    """Attention with the token axis zero-padded to a multiple of `multiple`.

    `q, k, v [N, T, H, Dh]` -> `[N, T, H, Dh]`. The padded keys are masked out (sequence
    lengths `T`) and the padded query rows dropped, so the result equals unpadded attention.
    """
    n, t = q.shape[:2]
    padded = -(-t // multiple) * multiple
    if padded != t:
        widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
    lengths = jnp.full((n,), t, jnp.int32)
    kw = dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kw)[:, :t]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None) -> jax.Array:
    """Softmax attention `[N, T, H, Dh]` -> `[N, T, H, Dh]`.

    `implementation`: 'xla'; 'cudnn' (cuDNN flash attention on the padded token axis, GPUs
    only); None chooses cuDNN for half-precision inputs on a GPU, falling back to XLA (with one
    warning) when cuDNN refuses them, and XLA everywhere else.
    """
    if implementation == "cudnn":
        return padded_attention(q, k, v, multiple=CUDNN_SEQ_MULTIPLE, implementation="cudnn")
    if implementation is None and jax.default_backend() == "gpu" and q.dtype in _HALF_DTYPES:
        try:
            return padded_attention(q, k, v, multiple=CUDNN_SEQ_MULTIPLE, implementation="cudnn")
        except (NotImplementedError, RuntimeError, ValueError) as e:
            if not _cudnn_refused:
                _cudnn_refused.append(str(e))
                warnings.warn(
                    f"cuDNN attention unavailable ({e}); using XLA attention", stacklevel=2
                )
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


class Attention(nnx.Module):
    """Multi-head self-attention with a fused `qkv` projection (rows q, k, v; heads contiguous).

    `implementation`: see `attention` (None = automatic, 'xla', 'cudnn').
    """

    def __init__(self, dim: int, num_heads: int, *, implementation: str | None = None, **kw):
        self.num_heads = num_heads  # dividing `dim`: `MAEConfig.validate`
        self.implementation = implementation
        self.qkv = linear(dim, 3 * dim, ("embed", "qkv"), **kw)
        self.proj = linear(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(n, t, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, H, Dh]
        out = attention(q, k, v, self.implementation)
        return self.proj(out.reshape(n, t, d))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, **kw):
        self.fc1 = linear(dim, hidden, ("embed", "mlp"), **kw)
        self.fc2 = linear(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class DropRate(nnx.Variable):
    """The stochastic-depth rate of one block: a constant, never trained or checkpointed.

    A value rather than a Python attribute, so every block has the same structure and the
    blocks can run as one scanned layer."""


class DropPath(nnx.Module):
    """Stochastic depth per sample (`rate` in [0, 1): probability of dropping the residual)."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = DropRate(jnp.asarray(rate, jnp.float32))
        self.deterministic = False
        self.rngs = rngs.fork()

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic:
            return x
        keep = 1.0 - self.rate.get_value()
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        draw = jax.random.bernoulli(self.rngs.dropout(), keep, shape)
        return x * draw.astype(x.dtype) / keep.astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.

    `drop_path`: None (no stochastic depth) or this block's rate (0.0 included, so the blocks
    of one model share their structure)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        attention_impl: str | None = None,
        drop_path: float | None = None,
        **kw,
    ):
        self.norm1 = layer_norm(dim, **kw)
        self.attn = Attention(dim, num_heads, implementation=attention_impl, **kw)
        self.norm2 = layer_norm(dim, **kw)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **kw)
        self.drop_path = DropPath(drop_path, rngs=kw["rngs"]) if drop_path is not None else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dp = self.drop_path if self.drop_path is not None else (lambda y: y)
        x = x + dp(self.attn(self.norm1(x)))
        return x + dp(self.mlp(self.norm2(x)))


# Activation rematerialization (`MAEConfig.remat`): what the backward pass keeps of each
# block's forward; the rest is recomputed. None: keep everything (no remat).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block inputs
    # keep the outputs of the projections (qkv, proj, fc1, fc2: matmuls without batch
    # dimensions), recompute attention, norms and GELU
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,  # attention scores kept too
}


def _with_layers_axis(var: nnx.Variable, value: jax.Array) -> nnx.Variable:
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        return var.replace(value)
    return var.replace(value, logical_axes=(None,) + tuple(axes))


def stack_blocks(blocks: list[Block]) -> Block:
    """Blocks of one structure -> one Block whose variables hold them all along a new leading
    axis (`[depth, ...]`; its `logical_axes` start with None: the layers axis is never
    sharded). `run_blocks` runs it as one scanned layer."""
    graphdefs, states = zip(*(nnx.split(block) for block in blocks))
    for i, graphdef in enumerate(graphdefs):
        if graphdef != graphdefs[0]:
            raise ValueError(f"block {i} differs in structure from block 0; cannot stack them")
    stacked = jax.tree.map(
        lambda *vs: _with_layers_axis(vs[0], jnp.stack([v.get_value() for v in vs])),
        *states,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdefs[0], stacked)


def _scan(stacked: Block, x: jax.Array, policy: Callable | None) -> jax.Array:
    """One `lax.scan` over the leading (layers) axis of a `stack_blocks` module: one block is
    compiled, whatever the depth."""
    graphdef, state = nnx.split(stacked)

    def body(carry, layer_state):
        block = nnx.merge(graphdef, layer_state)
        return block(carry), nnx.state(block, nnx.RngState)

    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, rng_states = jax.lax.scan(body, x, state)
    nnx.update(stacked, rng_states)  # the RNG streams advanced in the scan
    return x


def run_blocks(blocks, x: jax.Array, remat: str = "none") -> jax.Array:
    """Apply transformer blocks to `x [N, T, D]`: a list of `Block`s one after the other, or
    a `stack_blocks` module as one scanned layer (the same result).

    `remat` names a `REMAT_POLICIES` entry: what each block keeps for the backward pass.
    """
    policy = REMAT_POLICIES[remat]
    if isinstance(blocks, Block):
        return _scan(blocks, x, policy)
    call = Block.__call__ if policy is None else nnx.remat(Block.__call__, policy=policy)
    for block in blocks:
        x = call(block, x)
    return x
