"""Ahead-of-time compile check: does the train step fit a target topology's memory?

  python -m mae_jax.aot --config=configs/mae_vit_large.py --topology=v4-32
  python -m mae_jax.aot --config=configs/mae_vit_huge.py --topology=v5p-64 --config.mesh.fsdp=8

Compiles the real pretraining step (the `jax.jit` object `train_step.build` returns for
training) for the config's model, optimizer, global batch and mesh on the devices of
`--topology`, without running it, and reports XLA's per-device memory analysis
(arguments, outputs, donated aliases, temporaries) against the per-device HBM.

Backends (`--backend`, reported in the output):
- `tpu`: the real TPU compiler on compile-only devices from
  `jax.experimental.topologies.get_topology_desc`; needs libtpu (not the TPU hardware). Found
  via `--libtpu_path`, `$TPU_LIBRARY_PATH`, `$VIRTUAL_ENV/opt/libtpu/libtpu/libtpu.so` (see
  docs/performance.md for the optional install), or an importable `libtpu` package.
- `cpu`: a stand-in when libtpu is missing: the same program compiled by the CPU compiler on N
  simulated host devices. Its memory figures are the CPU compiler's, NOT the TPU's (different
  fusion, layouts and precision handling): for ViT-L at batch 4096 on v4-32 it reported
  65 GiB per device where the TPU compiler reports 28.7 GiB. A rough guide only.
- `gpu`: the locally attached GPUs, when the topology names a GPU (e.g. `h100-8`).
`auto` picks `tpu` (or `gpu`) when possible, else `cpu`.

Topology names: `v4-N` and `v5p-N` count TensorCores (N/2 chips, one megacore device per chip),
`v5e-N` (alias `v5litepod-N`) and `v6e-N` count chips, `h100-N`/`h200-N`/`a100-N` count GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from mae_jax import compile_cache, flops
from mae_jax import sharding as shd
from mae_jax.spec import first_line
from mae_jax.tasks import pretrain

GIB = 1024**3
FIT_HINT = "try --config.model.remat=full, a larger mesh.fsdp or a smaller batch"


@dataclasses.dataclass(frozen=True)
class Generation:
    platform: str  # 'tpu' or 'gpu'
    hbm_gib: float  # per device (per chip for TPUs)
    counts_cores: bool  # the name's number counts TensorCores (2 per chip), not chips
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e); 0 for GPUs
    device_kind: str


GENERATIONS = {
    "v4": Generation("tpu", 32.0, True, 3, "TPU v4"),
    "v5p": Generation("tpu", 95.0, True, 3, "TPU v5"),
    "v5e": Generation("tpu", 16.0, False, 2, "TPU v5 lite"),
    "v6e": Generation("tpu", 32.0, False, 2, "TPU v6 lite"),
    "h100": Generation("gpu", 80.0, False, 0, "NVIDIA H100 80GB HBM3"),
    "h200": Generation("gpu", 141.0, False, 0, "NVIDIA H200"),
    "a100": Generation("gpu", 80.0, False, 0, "NVIDIA A100-SXM4-80GB"),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
_2D_CHIPS = (1, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. 'v4-32'
    generation: str  # key of GENERATIONS
    num_devices: int  # chips (TPU, megacore) or GPUs
    shape: tuple[int, ...]  # chip grid, e.g. (2, 2, 4); () for GPUs
    hbm_gib: float

    @property
    def platform(self) -> str:
        return GENERATIONS[self.generation].platform


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """Standard chip grid: start at 2x2x1 (3-D) or 1x1 (2-D) and double the smallest axis
    (the last of equals) until it holds `chips`: v4-32 -> 2x2x4, v5p-64 -> 2x4x4, v5e-16 -> 4x4."""
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str, hbm_gib: float | None = None) -> Topology:
    """`'v4-32'` -> Topology(v4, 16 chips, (2, 2, 4), 32 GiB). ValueError on unknown names."""
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", (name or "").strip().lower())
    known = (
        "v4-N, v5p-N (N TensorCores), v5e-N / v5litepod-N, v6e-N (N chips), h100-N, h200-N, a100-N"
    )
    if not m:
        raise ValueError(f"unknown topology {name!r}; expected one of {known}, e.g. v4-32")
    gen = ALIASES.get(m.group(1), m.group(1))
    if gen not in GENERATIONS:
        raise ValueError(
            f"unknown accelerator {m.group(1)!r} in topology {name!r}; expected one of {known}"
        )
    g = GENERATIONS[gen]
    n = int(m.group(2))
    if g.counts_cores:
        if n < 8 or n & (n - 1):
            raise ValueError(
                f"topology {name!r}: {gen}-N counts TensorCores (2 per chip); N must "
                f"be a power of two >= 8 (e.g. {gen}-8, {gen}-32), got {n}"
            )
        chips, shape = n // 2, _grid(n // 2, 3)
    elif g.dims == 2:
        if n not in _2D_CHIPS:
            raise ValueError(
                f"topology {name!r}: {gen}-N counts chips; N must be one of {_2D_CHIPS}, got {n}"
            )
        chips, shape = n, _grid(n, 2)
    else:
        if n < 1:
            raise ValueError(f"topology {name!r}: need at least one GPU, got {n}")
        chips, shape = n, ()
    if hbm_gib is not None and hbm_gib <= 0:
        raise ValueError(f"per-device HBM must be positive, got {hbm_gib} GiB")
    return Topology(name, gen, chips, shape, float(hbm_gib or g.hbm_gib))


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f} GiB"


# ------------------------------------------------------------------------------ devices
def find_libtpu(path: str | None = None) -> str | None:
    """Path of libtpu.so: `path`, $TPU_LIBRARY_PATH, $VIRTUAL_ENV/opt/libtpu (or the running
    interpreter's prefix), or the `libtpu` package; None if none exists."""
    prefixes = [p for p in (os.environ.get("VIRTUAL_ENV"), sys.prefix) if p]
    candidates = [path, os.environ.get("TPU_LIBRARY_PATH")]
    candidates += [os.path.join(p, "opt", "libtpu", "libtpu", "libtpu.so") for p in prefixes]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    if path:
        raise ValueError(f"--libtpu_path {path!r} is not a file")
    try:
        import libtpu  # type: ignore

        return libtpu.get_library_path()
    except Exception:  # noqa: BLE001 - not installed or broken: no TPU compiler
        return None


def resolve_backend(topo: Topology, backend: str, libtpu_path: str | None = None) -> str:
    """'auto' -> the best available backend for `topo`; checks an explicit choice."""
    if backend in ("tpu", "gpu") and backend != topo.platform:
        raise ValueError(
            f"topology {topo.name} is a {topo.platform.upper()} topology; "
            f"--backend={backend} cannot compile for it (use auto or cpu)"
        )
    if backend == "tpu" and find_libtpu(libtpu_path) is None:
        raise ValueError(
            "--backend=tpu needs libtpu (the TPU compiler): set TPU_LIBRARY_PATH "
            "or --libtpu_path, see docs/performance.md; or use --backend=cpu"
        )
    if backend != "auto":
        return backend
    if topo.platform == "tpu":
        return "tpu" if find_libtpu(libtpu_path) is not None else "cpu"
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    return "gpu" if len(gpus) >= topo.num_devices else "cpu"


def select_backend(config, topo: Topology, backend: str, libtpu_path: str | None = None) -> str:
    """`resolve_backend`; call it before JAX starts its backends. For the CPU stand-in it asks JAX
    for `topo.num_devices` host devices (a started backend keeps its count, and
    `topology_devices` then says how to get more); it turns `config.compilation_cache`
    (`mae_jax.compile_cache`) on, off for 'tpu': compile-only TPU devices write cache entries but
    cannot load them."""
    chosen = resolve_backend(topo, backend, libtpu_path)
    if chosen == "cpu":
        # JAX refuses once its backends started (resolve_backend may probe GPUs)
        with contextlib.suppress(RuntimeError):
            jax.config.update("jax_num_cpu_devices", topo.num_devices)
    cache = config.get("compilation_cache", compile_cache.AUTO)
    compile_cache.enable("none" if chosen == "tpu" else cache)
    return chosen


def topology_devices(topo: Topology, backend: str, libtpu_path: str | None = None) -> list:
    """Devices to compile for: compile-only TPU devices, local GPUs, or host CPU devices."""
    if backend == "tpu":
        lib = find_libtpu(libtpu_path)
        if lib is None:
            raise ValueError("libtpu not found; see docs/performance.md")
        jax.devices()  # start the local backends first, so JAX does not probe for a TPU
        os.environ["TPU_LIBRARY_PATH"] = lib
        # No TPU VM here: tell libtpu so instead of letting it query the metadata server.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # Compile-only: several processes may load libtpu at once (no chips to guard).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        from jax.experimental import topologies

        shape = topo.shape + (1,) * (3 - len(topo.shape))
        per_host = (
            (2, 4, 1)
            if topo.num_devices == 8 and len(topo.shape) == 2
            else tuple(min(a, b) for a, b in zip(shape, (2, 2, 1)))
        )
        kw = dict(chips_per_host_bounds=per_host, num_slices=1, wrap=(False, False, False))
        if GENERATIONS[topo.generation].counts_cores:
            kw["chip_config_name"] = "megacore"
        grid = "x".join(map(str, topo.shape))  # the GENERATIONS key is the prefix: 'v4:2x2x4'
        desc = topologies.get_topology_desc(f"{topo.generation}:{grid}", "tpu", **kw)
        devices = list(desc.devices)
    else:
        try:
            devices = list(jax.devices(backend))
        except RuntimeError as e:
            raise ValueError(f"no {backend} devices: {e}") from e
        if len(devices) < topo.num_devices:
            hint = (
                f"run in a fresh process (python -m mae_jax.aot sets it) or set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={topo.num_devices}"
                if backend == "cpu"
                else "use a machine with enough GPUs"
            )
            raise ValueError(
                f"topology {topo.name} needs {topo.num_devices} {backend} devices, "
                f"{len(devices)} are available; {hint}"
            )
        devices = devices[: topo.num_devices]
    if len(devices) != topo.num_devices:
        raise ValueError(
            f"topology {topo.name}: expected {topo.num_devices} devices, the "
            f"backend gave {len(devices)}"
        )
    return devices


# ------------------------------------------------------------------------------ compile
def lower_train_step(config: ml_collections.ConfigDict, mesh: Mesh):
    """Lower the pretraining step for `config` on `mesh` from abstract values only: the very
    `jax.jit` object training runs (`tasks.pretrain.step_fns`), lowered without executing
    anything (compile-only devices can hold no arrays). Returns `(lowered, plan)`."""
    p = pretrain.plan_without_data(config, 1000)
    pretrain.check_mesh(config, mesh)
    fns = pretrain.step_fns(config, p, mesh)
    c = p.model
    shape = (config.batch_size, c.img_size, c.img_size, c.in_chans)
    return fns.jit_step.lower(*fns.abstract_args({"image": (shape, jnp.float32)})), p


def memory_report(compiled, hbm_gib: float) -> dict:
    """Per-device bytes from `compiled.memory_analysis()` and the fit against `hbm_gib`.

    total = arguments + outputs - aliased (donated state reused for the new state)
            + temporaries + generated code.
    """
    m = compiled.memory_analysis()
    if m is None:
        raise ValueError("this backend gives no memory analysis for compiled programs")
    fields = ("argument", "output", "alias", "temp", "generated_code")
    arg, out, alias, temp, code = (int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in fields)
    total = arg + out - alias + temp + code
    hbm = hbm_gib * GIB
    return {
        "argument_bytes": arg,
        "output_bytes": out,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "code_bytes": code,
        "total_bytes": total,
        "hbm_bytes": int(hbm),
        "fraction_of_hbm": total / hbm,
        "fits": total <= hbm,
    }


def check(
    config: ml_collections.ConfigDict,
    topology: str | Topology,
    *,
    backend: str = "auto",
    hbm_gib: float | None = None,
    libtpu_path: str | None = None,
) -> dict:
    """Compile the train step of `config` for `topology` (a name, or one parsed with its HBM);
    return a report dict."""
    topo = topology if isinstance(topology, Topology) else parse_topology(topology, hbm_gib)
    chosen = resolve_backend(topo, backend, libtpu_path)
    devices = topology_devices(topo, chosen, libtpu_path)
    mesh = shd.make_mesh(config.mesh, devices=devices)
    t0 = time.perf_counter()
    lowered, p = lower_train_step(config, mesh)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    report = {
        "topology": topo.name,
        "topology_grid": "x".join(map(str, topo.shape)) or None,
        "num_devices": topo.num_devices,
        "target_device_kind": GENERATIONS[topo.generation].device_kind,
        "compiled_for_backend": chosen,
        "compiled_device_kind": getattr(devices[0], "device_kind", str(devices[0])),
        "stand_in": chosen != topo.platform,
        "model": p.model.name,
        "dtype": p.model.dtype,
        "remat": p.model.remat,
        "global_batch": int(config.batch_size),
        "grad_accum_steps": int(config.grad_accum_steps),
        "per_device_batch": int(config.batch_size)
        // int(config.grad_accum_steps)
        // shd.data_parallel_size(mesh),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "jax_version": jax.__version__,
        "model_tflop_per_step": flops.mae_train_flops_per_image(p.model) * config.batch_size / 1e12,
    }
    report.update(memory_report(compiled, topo.hbm_gib))
    return report


def out_of_memory_message(error: Exception, topology: str) -> str:
    """The verdict when the compiler itself gives up for lack of memory (TPU: it refuses a
    program whose temporaries exceed the HBM, before any memory analysis exists)."""
    return (
        f"per-device total: more than the HBM of {topology} -> DOES NOT FIT (the compiler "
        f"refused the program: {first_line(error)}); {FIT_HINT}"
    )


def format_report(r: dict, verdict: bool = True) -> str:
    """`check`'s report as lines; `verdict=False` leaves out FITS / DOES NOT FIT (for a caller
    that gives no verdict from a stand-in's figures)."""
    lines = [
        f"AOT compile check: {r['model']} ({r['dtype']} compute, remat={r['remat']}), "
        f"global batch {r['global_batch']} (grad_accum_steps {r['grad_accum_steps']}, "
        f"{r['per_device_batch']} per device per micro-step)",
        f"target: {r['topology']} = {r['num_devices']} x {r['target_device_kind']}"
        + (f", chip grid {r['topology_grid']}" if r["topology_grid"] else "")
        + f", mesh {r['mesh']}",
        f"compiled for backend: {r['compiled_for_backend']} ({r['compiled_device_kind']}), "
        f"jax {r['jax_version']}; lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s",
    ]
    if r["stand_in"]:
        lines.append(
            "WARNING: stand-in compile: the memory figures below are the "
            f"{r['compiled_for_backend'].upper()} compiler's for the same program, not "
            f"the {r['target_device_kind']} compiler's and can be far off (2.3x too "
            "high for ViT-L at batch 4096 on v4-32, docs/performance.md); install "
            "libtpu for real TPU figures"
        )
    lines += [
        f"per-device memory: arguments {gib(r['argument_bytes'])}, outputs "
        f"{gib(r['output_bytes'])}, aliased (donated) {gib(r['alias_bytes'])}, temporaries "
        f"{gib(r['temp_bytes'])}, code {gib(r['code_bytes'])}",
        f"per-device total: {gib(r['total_bytes'])} of {gib(r['hbm_bytes'])} HBM "
        f"({100 * r['fraction_of_hbm']:.1f}%)"
        + (f" -> {'FITS' if r['fits'] else 'DOES NOT FIT'}" if verdict else ""),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI
def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    cfg = config_flags.DEFINE_config_file(
        "config", None, "Pretraining config file.", lock_config=True
    )
    flags.DEFINE_string("topology", None, "Target, e.g. v4-32, v5p-64, v5e-16, v6e-16, h100-8.")
    flags.DEFINE_enum(
        "backend",
        "auto",
        ["auto", "tpu", "gpu", "cpu"],
        "Compiler to use; auto = the target's own when available, else cpu.",
    )
    flags.DEFINE_float("hbm_gib", None, "Per-device memory in GiB (default: the target's).")
    flags.DEFINE_string("libtpu_path", None, "Path of libtpu.so (default: see module doc).")
    flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
    flags.mark_flags_as_required(["config", "topology"])
    return cfg


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        topo = parse_topology(f.topology, f.hbm_gib)
        backend = select_backend(_CONFIG.value, topo, f.backend, f.libtpu_path)
        report = check(_CONFIG.value, topo, backend=backend, libtpu_path=f.libtpu_path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(out_of_memory_message(e, f.topology), flush=True)
        sys.exit(1)
    print(format_report(report), flush=True)
    if f.json:
        with open(f.json, "w") as fh:
            json.dump(report, fh, indent=2, sort_keys=True)
    sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
    from absl import app as _app

    _CONFIG = _define_flags()
    _app.run(main)
