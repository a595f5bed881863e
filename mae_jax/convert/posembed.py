"""Position-embedding tables across patch grids: PyTorch-exact bicubic resize, sin-cos detection.

A table is `[1, 1 + h*w, D]` (a leading cls row, then the patch rows in row-major grid
order), as in the official release. Everything here is numpy only (no torch, no jax).
"""

from __future__ import annotations

import math

import numpy as np

from mae_jax import ops
from mae_jax.spec import ok

# Largest absolute difference for a table to count as the fixed sin-cos one (covers tables
# that went through bfloat16/float16 storage; learned tables are far from it).
SINCOS_ATOL = 5e-3


def grid_of(num_tokens: int, num_extra: int = 1) -> int:
    """Side of the square patch grid of a table with `num_tokens` rows (`num_extra` cls rows)."""
    n = num_tokens - num_extra
    side = math.isqrt(max(n, 0))
    if n <= 0 or side * side != n:
        raise ValueError(
            f"a position table with {num_tokens} rows ({num_extra} extra) does not hold a square "
            f"patch grid"
        )
    return side


def _cubic(x: float) -> float:
    """PyTorch's cubic convolution kernel (A = -0.75) at distance `x`."""
    a = -0.75  # PyTorch's bicubic kernel coefficient
    x = abs(x)
    if x <= 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` float64 weights of 1-D bicubic resampling, as
    `torch.nn.functional.interpolate(mode='bicubic', align_corners=False)`: source coordinate
    `(i + 0.5) * n_in / n_out - 0.5`, 4 taps, indices clamped to the border."""
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"grid sizes must be positive, got {n_in} -> {n_out}")
    mat = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = scale * (i + 0.5) - 0.5
        i0 = math.floor(src)
        t = src - i0
        for k in range(-1, 3):
            idx = min(max(i0 + k, 0), n_in - 1)
            mat[i, idx] += _cubic(k - t)
    return mat


def interpolate_pos_embed(table: np.ndarray, new_grid: int, num_extra: int = 1) -> np.ndarray:
    """`[1, E + g*g, D]` -> `[1, E + new_grid**2, D]`: extra (cls) rows kept, patch rows resized
    bicubically on the grid, as the official `interpolate_pos_embed`. Same grid: unchanged."""
    table = np.asarray(table, np.float32)
    if table.ndim != 3 or table.shape[0] != 1:
        raise ValueError(f"position table must be [1, T, D], got shape {table.shape}")
    g = grid_of(table.shape[1], num_extra)
    if g == new_grid:
        return table
    m = bicubic_matrix(g, new_grid)
    patches = np.asarray(table[0, num_extra:], np.float64).reshape(g, g, table.shape[-1])
    resized = np.einsum("ih,jw,hwd->ijd", m, m, patches).reshape(new_grid * new_grid, -1)
    return np.concatenate([table[0, :num_extra], resized.astype(np.float32)], axis=0)[None]


def is_sincos(table: np.ndarray, atol: float = SINCOS_ATOL) -> bool:
    """Whether `[1, 1 + g*g, D]` is the fixed 2-D sin-cos table (zero cls row) of its grid."""
    table = np.asarray(table, np.float32)
    dim = table.shape[-1]
    if table.ndim != 3 or dim % 4:
        return False
    try:
        g = grid_of(table.shape[1])
    except ValueError:
        return False
    return bool(np.allclose(table[0], ops.sincos_2d(dim, g), rtol=0.0, atol=atol))


def resize_pos_embed(table: np.ndarray, new_grid: int) -> np.ndarray:
    """A table for `new_grid`: unchanged on the same grid; the exact sin-cos table of the new
    grid when `table` is the fixed sin-cos one; otherwise bicubic interpolation."""
    table = np.asarray(table, np.float32)
    if grid_of(table.shape[1]) == new_grid:
        return table
    if is_sincos(table):
        return ops.sincos_2d(table.shape[-1], new_grid)[None]
    return interpolate_pos_embed(table, new_grid)


def table_at(table: np.ndarray | None, dim: int, grid: int) -> np.ndarray:
    """`table` resized to `grid` (`resize_pos_embed`); None: the fixed sin-cos table
    `[1, 1 + grid**2, dim]`."""
    if table is None:
        return ops.sincos_2d(dim, grid)[None]
    return resize_pos_embed(table, grid)


def target_grid(config, img_size: int | None) -> int:
    """Patch grid side for `img_size` (default: the config's image size)."""
    if img_size is None:
        return config.grid_size
    if not ok("int>=1", img_size) or img_size % config.patch_size:
        raise ValueError(
            f"img_size must be a positive multiple of the patch size {config.patch_size}, "
            f"got {img_size!r}"
        )
    return img_size // config.patch_size
