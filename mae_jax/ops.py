"""Pure MAE operations: patchify, per-sample random masking, unshuffle, sin-cos position
embeddings and the masked reconstruction loss.

Everything here is a pure function of arrays (no state, no classes), usable under
`jax.jit`, `jax.vmap` and `jax.grad`. Layouts follow the official PyTorch MAE release:

- images are NHWC `[N, H, W, C]`;
- a patch vector is `[p*p*C]`, flattened as (row in patch, column in patch, channel);
- patches are ordered row-major over the `h x w` grid, `L = h * w`;
- `mask` is 1 for removed patches and 0 for kept ones, in the original patch order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.spec import require


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Images `[N, H, W, C]` -> patch vectors `[N, L, p*p*C]` (official order)."""
    if images.ndim != 4:
        raise ValueError(f"patchify expects NHWC images [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    p = patch_size
    if p <= 0:
        raise ValueError(f"patch size must be a positive integer, got {p}")
    if h % p or w % p:
        raise ValueError(
            f"image size {h}x{w} is not divisible by the patch size {p}; "
            f"use an image size that is a multiple of {p}"
        )
    gh, gw = h // p, w // p
    x = images.reshape(n, gh, p, gw, p, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # n, gh, gw, p, p, c
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(
    patches: jax.Array, patch_size: int, grid_hw: tuple[int, int] | None = None, channels: int = 3
) -> jax.Array:
    """Patch vectors `[N, L, p*p*C]` -> images `[N, h*p, w*p, C]`.

    `grid_hw` is the patch grid `(h, w)`; when omitted the grid must be square.
    """
    if patches.ndim != 3:
        raise ValueError(f"unpatchify expects [N, L, p*p*C], got shape {patches.shape}")
    n, num_patches, dim = patches.shape
    p = patch_size
    if dim != p * p * channels:
        raise ValueError(
            f"patch vector length {dim} does not match patch size {p} and {channels} channels "
            f"(expected {p * p * channels})"
        )
    if grid_hw is None:
        side = int(round(num_patches**0.5))
        if side * side != num_patches:
            raise ValueError(
                f"{num_patches} patches do not form a square grid; pass grid_hw=(h, w)"
            )
        grid_hw = (side, side)
    gh, gw = grid_hw
    if gh * gw != num_patches:
        raise ValueError(f"grid {gh}x{gw} does not hold {num_patches} patches")
    x = patches.reshape(n, gh, gw, p, p, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # n, gh, p, gw, p, c
    return x.reshape(n, gh * p, gw * p, channels)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches, exactly as the reference: `int(L * (1 - ratio))`."""
    require("mask_ratio", mask_ratio, "num[0,1)")
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    *,
    key: jax.Array | None = None,
    noise: jax.Array | None = None,
):
    """Per-sample random masking by argsort of uniform noise (the reference's algorithm).

    Exactly one of `key` (a PRNG key; noise ~ U[0, 1) of shape `[N, L]` is drawn) or `noise`
    (`[N, L]`, float) must be given. Small noise is kept.

    Returns `(ids_keep [N, L_keep], mask [N, L], ids_restore [N, L])` with
    `L_keep = int(L * (1 - mask_ratio))`; `mask` is float32, 1 = removed, in patch order.
    """
    len_keep = num_kept(num_patches, mask_ratio)
    if (key is None) == (noise is None):
        raise ValueError("random_masking needs exactly one of key= or noise=")
    if noise is None:
        noise = jax.random.uniform(key, (batch_size, num_patches), dtype=jnp.float32)
    elif tuple(noise.shape) != (batch_size, num_patches):
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}, expected [N, L] = ({batch_size}, {num_patches})"
        )
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask_shuffled = (jnp.arange(num_patches) >= len_keep).astype(jnp.float32)
    mask = jnp.take_along_axis(
        jnp.broadcast_to(mask_shuffled, (batch_size, num_patches)), ids_restore, axis=1
    )
    return ids_keep, mask, ids_restore


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
    """Select tokens per sample: `x [N, L, D]`, `ids [N, K]` -> `[N, K, D]`."""
    return jnp.take_along_axis(x, ids[..., None], axis=1)


@jax.custom_vjp
def permute_tokens(x: jax.Array, order: jax.Array) -> jax.Array:
    """`x [N, L, D]` with its tokens reordered by the permutations `order [N, L]`:
    `out[n, i] = x[n, order[n, i]]`.

    Equal to `gather_tokens(x, order)`, but its gradient is the inverse permutation, again a
    gather, where the gather's own gradient is a scatter-add: slow on CPUs and TPUs, and
    `order` being a permutation, never needed."""
    return gather_tokens(x, order)


def _permute_bwd(order, grad):
    return gather_tokens(grad, jnp.argsort(order, axis=1)), None  # the inverse permutation


permute_tokens.defvjp(lambda x, order: (gather_tokens(x, order), order), _permute_bwd)


def unshuffle(visible: jax.Array, mask_token: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """Put visible tokens back in patch order and fill the removed ones with `mask_token`.

    `visible [N, L_keep, D]` (in shuffled order), `mask_token [1, 1, D]`,
    `ids_restore [N, L]` (a permutation per sample) -> `[N, L, D]`.
    """
    n, len_keep, d = visible.shape
    num_patches = ids_restore.shape[1]
    fill = jnp.broadcast_to(mask_token.astype(visible.dtype), (n, num_patches - len_keep, d))
    return permute_tokens(jnp.concatenate([visible, fill], axis=1), ids_restore)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """1-D sin-cos embedding: `positions [M]` -> `[M, dim]` = `[sin(pos*f_k), cos(pos*f_k)]`."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dimension must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(positions, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_hw: tuple[int, int] | int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos position embeddings, `[1 + h*w, dim]` (or `[h*w, dim]`), float32.

    Token `1 + r*w + c`: the first `dim/2` channels encode column `c`, the last `dim/2` row `r`.
    The leading cls row is all zeros. Computed in float64 then cast, as the reference.
    """
    if isinstance(grid_hw, int):
        grid_hw = (grid_hw, grid_hw)
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dimension must be a multiple of 4, got {dim}")
    gh, gw = grid_hw
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    emb = np.concatenate(
        [sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], axis=1
    )
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb.astype(np.float32)


def normalize_targets(target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-patch normalization of `[..., P]` by mean and the unbiased variance (`norm_pix_loss`)."""
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    return (target - mean) / jnp.sqrt(var + eps)


def mae_loss(
    pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix_loss: bool = False
) -> jax.Array:
    """Masked MSE: per-patch mean over `[p*p*C]`, then mean over removed patches.

    `pred`, `target`: `[N, L, p*p*C]`; `mask`: `[N, L]` with 1 = removed. Computed in float32.
    With no removed patch at all the loss is 0 (the reference would divide by zero).
    """
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    if norm_pix_loss:
        target = normalize_targets(target)
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)
