"""Device mesh, logical-axis rules, and global batch assembly.

The mesh has three axes, `('data', 'fsdp', 'tensor')`, with Auto axis types (GSPMD
propagation; `jax.make_mesh` defaults to Explicit on recent JAX, so we say so). The batch is
split over `data` and `fsdp`; parameters and optimizer state carry `logical_axes` metadata
(set by the model modules) that the rules map to mesh axes, so data parallel, FSDP and tensor
parallel are mesh shapes, not separate code paths. A parameter dimension that a mesh axis does
not divide stays replicated along it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or None). Overridable from the config (`config.sharding_rules`).
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
)


def rules(config_rules=None) -> tuple[tuple[str, str | None], ...]:
    """`config.sharding_rules` as a tuple of (logical axis, mesh axis) pairs; None: the defaults."""
    if not config_rules:
        return DEFAULT_RULES
    return tuple((str(a), None if m is None else str(m)) for a, m in config_rules)


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolve `{data, fsdp, tensor}` (one of them may be -1 = the rest) for `num_devices`."""
    sizes = [int(mesh_config[a]) if a in mesh_config else 1 for a in MESH_AXES]
    extra = set(mesh_config.keys()) - set(MESH_AXES) if hasattr(mesh_config, "keys") else set()
    if extra:
        raise ValueError(f"unknown mesh axes {sorted(extra)}; the mesh axes are {MESH_AXES}")
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    for axis, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {axis}={size}: sizes must be positive or -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if fills:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by "
                f"the fixed axes' product {known}"
            )
        sizes[fills[0]] = num_devices // known
    total = int(np.prod(sizes))
    if total != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices but {num_devices} are "
            f"available; change config.mesh (e.g. set one axis to -1)"
        )
    return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `('data', 'fsdp', 'tensor')` mesh with Auto axis types over all (or given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data and fsdp axes."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_to_spec(
    logical_axes: Iterable[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Iterable[tuple[str, str | None]] = DEFAULT_RULES,
) -> P:
    """PartitionSpec for one array from its logical axis names (divisibility-checked)."""
    if logical_axes is None:
        return P()
    table = dict(rules)
    spec, used = [], set()
    for name, dim in zip(logical_axes, shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or dim % mesh.shape[axis] or mesh.shape[axis] == 1:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(
    abstract_tree: Any, mesh: Mesh, rules: Iterable[tuple[str, str | None]] = DEFAULT_RULES
) -> Any:
    """Shardings for a pytree holding `nnx.Variable`s (params, optimizer state) and plain
    leaves (step counters): Variables by their `logical_axes`, everything else replicated.

    The result has the same pytree structure as `abstract_tree`.
    """
    rules = tuple(rules)

    def one(x):
        if _is_variable(x):
            axes = x.get_metadata().get("logical_axes")
            spec = logical_to_spec(axes, x.get_value().shape, mesh, rules)
            return x.replace(NamedSharding(mesh, spec))
        return replicated(mesh)

    return jax.tree.map(one, abstract_tree, is_leaf=_is_variable)


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Host-local numpy batch (this process's rows) -> global `jax.Array`s sharded over the
    batch axes. On one process this is a plain device_put with the batch sharding."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )


def process_local(tree: Any) -> Any:
    """Global arrays -> arrays this process holds alone: a replicated array's local copy, a
    sharded one gathered to numpy (a collective: every process must call this together)."""
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return x.addressable_data(0)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)


def collect(
    run: Callable,
    state,
    batches: Iterable[dict],
    mesh,
    *,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Run the sharded feature program `run(state, global batch)` over host-local batches
    `{'image', 'mask', ...}` (this process's rows: its j-th row is example `j * P + p` of P
    processes) and gather the outputs of the real examples (`mask`, and index < `limit`) on
    every process, in batch order: `{'features' [N, D], ..., 'index' [N]}` (all must call this
    together; the batches stop being read past `limit`). `progress(examples kept, batches
    done)` after each batch."""
    p, pc = jax.process_index(), jax.process_count()
    parts: dict[str, list] = {}
    done, bound = 0, np.inf if limit is None else limit
    for i, batch in enumerate(batches):
        local = len(batch["mask"])
        j = i * local + np.arange(local)  # this process's rows: examples j * P + p
        keep = np.asarray(batch["mask"], bool) & (j * pc + p < bound)
        out = process_local(run(state, global_batch({**batch, "mask": keep}, mesh)))
        rows = np.asarray(out.pop("mask"), bool)
        # the global batch is the processes' rows, process after process
        out["index"] = (j[None, :] * pc + np.arange(pc)[:, None]).ravel()
        for key, value in out.items():
            parts.setdefault(key, []).append(np.asarray(value)[rows])
        done += int(rows.sum())
        if progress is not None:
            progress(done, i + 1)
        if (i + 1) * local * pc >= bound:
            break  # every later example is past the limit
    return {key: np.concatenate(values) for key, values in parts.items()}
