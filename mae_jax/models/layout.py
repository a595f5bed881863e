"""The two layouts of a model's transformer blocks in parameter trees, and the conversion.

- per block (`scan_layers=False`, and the only layout of the PyTorch formats):
  `blocks: {0: {attn: {qkv: {kernel: [D, 3D]}}, ...}, 1: {...}, ...}`;
- stacked (`scan_layers=True`): `blocks: {attn: {qkv: {kernel: [depth, D, 3D]}}, ...}`, one
  array per block parameter with the blocks along a new leading axis.

The same holds for `decoder_blocks`, wherever those keys appear in a tree (parameters,
optimizer moments, checkpoints). Trees here are nested mappings (dicts, `nnx.State`s, Orbax
metadata trees) and sequences, with arrays, `jax.ShapeDtypeStruct`s or array metadata
(anything with `.shape` and `.dtype`) as leaves; block indices may be ints or digit strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

STACKS = ("blocks", "decoder_blocks")


def is_per_block(subtree: Any) -> bool:
    """Whether a `blocks` subtree is keyed by block index (0, 1, ... or '0', '1', ...)."""
    return (
        isinstance(subtree, Mapping)
        and len(subtree) > 0
        and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in subtree)
    )


def _is_leaf(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _stack(leaves: list) -> Any:
    first = leaves[0]
    if isinstance(first, (np.ndarray, np.generic, jax.Array)):
        return np.stack([np.asarray(x) for x in leaves])
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)


def _index(leaf: Any, i: int) -> Any:
    if isinstance(leaf, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(leaf[i])
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)


def stack(subtree: Mapping) -> dict:
    """A per-block `blocks` subtree -> the stacked one (leaves stacked in block order)."""
    order = sorted(subtree, key=int)
    if [int(k) for k in order] != list(range(len(order))):
        raise ValueError(f"block indices {sorted(int(k) for k in order)} are not 0..n-1")
    blocks = [subtree[k] for k in order]
    return jax.tree.map(lambda *xs: _stack(list(xs)), *blocks, is_leaf=_is_leaf)


def unstack(subtree: Mapping) -> dict:
    """A stacked `blocks` subtree -> the per-block one (`{0: ..., 1: ...}`)."""
    leaves = jax.tree.leaves(subtree, is_leaf=_is_leaf)
    if not leaves:
        raise ValueError("an empty blocks subtree")
    depth = int(leaves[0].shape[0])
    return {
        i: jax.tree.map(lambda x, i=i: _index(x, i), dict(subtree), is_leaf=_is_leaf)
        for i in range(depth)
    }


def _to_dict(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _to_dict(v) for k, v in x.items()}
    return x


def convert(tree: Any, stacked: bool) -> Any:
    """`tree` with every `blocks` / `decoder_blocks` subtree in the given layout (plain dicts
    with int block keys there; mappings elsewhere become dicts, sequences lists or tuples)."""
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            if key in STACKS and isinstance(value, Mapping) and value:
                if stacked and is_per_block(value):
                    value = stack(_to_dict(value))
                elif not stacked and not is_per_block(value):
                    value = unstack(_to_dict(value))
            out[key] = convert(value, stacked)
        return out
    if isinstance(tree, list):
        return [convert(v, stacked) for v in tree]
    if isinstance(tree, tuple) and not _is_leaf(tree):
        return tuple(convert(v, stacked) for v in tree)
    return tree


def layout_of(tree: Any) -> bool | None:
    """True (stacked), False (per block) or None (no block stacks) for a parameter or train
    state tree; ValueError if its stacks disagree."""
    found = set()

    def walk(x):
        if isinstance(x, Mapping):
            for key, value in x.items():
                if key in STACKS and isinstance(value, Mapping) and value:
                    found.add(not is_per_block(value))
                else:
                    walk(value)
        elif isinstance(x, (list, tuple)) and not _is_leaf(x):
            for v in x:
                walk(v)

    walk(tree)
    if len(found) > 1:
        raise ValueError("a tree with both stacked and per-block transformer blocks")
    return found.pop() if found else None


def like(tree: Any, reference: Any) -> Any:
    """`tree` converted to the layout of `reference` (unchanged when either has no blocks)."""
    want = layout_of(reference)
    if want is None or layout_of(tree) in (None, want):
        return tree
    return convert(tree, want)
