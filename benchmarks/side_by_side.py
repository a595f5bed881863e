"""Our MAE pretraining step and a PyTorch one holding the same weights, timed in one process.

  python benchmarks/side_by_side.py --models vit_base,vit_large --batch 256 \
      [--dtype bfloat16|float32] [--compile|--no-compile] [--steps 20] [--warmup 3] \
      [--peak_tflops 800] [--json out.json]

Ours: `mae_jax.benchmark` (the training step of configs/mae_pretrain.py's recipe with the
model, dtype and batch asked for, on one JAX device, synthetic device-resident images).
PyTorch: Hugging Face `ViTMAEForPreTraining` (SDPA attention) loaded from our export of that
very state, trained on the same images and masking noise: forward (under `torch.autocast`
for bfloat16), `loss.backward()`, AdamW (fused where torch has it; the lr, betas, eps and
weight decay of our optimizer config; no decay on 1-D parameters, i.e. norms and biases, as
the official code), `step()`, `zero_grad(set_to_none=True)`; `--compile` wraps the model in
`torch.compile` (default: on for CUDA; off on the CPU, where it took 116-164 s to compile even
`mae_vit_test` on 2 busy cores and its steps ran slower than eager ones).

Before timing, a parity check: our float32 loss and the PyTorch model's on the same images
and noise (the first training step's loss) must give identical masks and agree to
`--parity_tol` (relative; default 1e-4), else the run stops with exit status 1.

Both sides report images/s, step time (median), model TFLOP/s (the same FLOP count,
`mae_jax.flops`), MFU (against `--peak_tflops` or the device's known peak), first-step
(compile) time and peak memory; then the ratio ours / PyTorch. On a CPU, use one JAX device:
`XLA_FLAGS=--xla_force_host_platform_device_count=1` (the script uses the first one anyway).

Notes: our step draws new masking noise each step, the PyTorch step reuses the step-0 noise
(the same number of kept patches, so the same work). On a GPU, our peak memory is JAX's
process-wide peak (it cannot be reset between models: list the smaller model first), and
JAX's preallocation is off so that both sides fit (XLA_PYTHON_CLIENT_PREALLOCATE=false
unless set). On one H200 (docs/performance.md) ViT-B/16 with three variants of our step, a
profile of each and the compiled PyTorch step took about 6 minutes; ViT-L/16 about 3.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import glob
import json
import os
import platform
import sys
import time
from collections.abc import Sequence

# JAX and PyTorch share the accelerator: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mae_jax import benchmark, config_file, convert, flops, models, optim, profiler  # noqa: E402
from mae_jax.convert import mapping  # noqa: E402
from mae_jax.models.config import PRESETS  # noqa: E402

RECIPE = os.path.join(ROOT, "configs", "mae_pretrain.py")
ALIASES = {
    "vit_base": "mae_vit_base_patch16",
    "vit_large": "mae_vit_large_patch16",
    "vit_huge": "mae_vit_huge_patch14",
}
DTYPES = ("bfloat16", "float32")
# Parity tolerance (relative, float32 loss). Measured: the two losses are equal to float32
# rounding (< 1e-7) for ViT-B/16 at batch 8 on the CPU; on an H200 (float32 at "highest"
# precision) 0.0 for ViT-B/16, 6.7e-8 for ViT-L/16, 1.2e-7 for ViT-H/14 (docs/performance.md). A wrong weight, norm_pix_loss or mask ratio moves the loss by
# percents. Another noise barely moves it (with norm_pix_loss on random images every patch's
# loss is about the same), so the masks are compared exactly as well.
PARITY_TOL = 1e-4


class ParityError(RuntimeError):
    """The two sides do not compute the same loss on the same weights, images and noise."""

    def __init__(self, record: dict, message: str):
        super().__init__(message)
        self.record = record


def resolve_model(name: str) -> str:
    """`vit_base` / `vit_large` / `vit_huge` or any preset name -> the preset name."""
    preset = ALIASES.get(name, name)
    if preset not in PRESETS:
        raise ValueError(
            f"unknown model {name!r}; expected one of {sorted(ALIASES)} or a preset "
            f"{sorted(PRESETS)}"
        )
    return preset


def make_config(preset: str, dtype: str, batch: int, overrides: dict | None = None):
    """The pretraining recipe's config with this model, compute dtype, global batch and model
    field `overrides` (e.g. `{"attention_impl": "xla", "scan_layers": True}`)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    if batch <= 0:
        raise ValueError(f"--batch must be positive, got {batch}")
    c = config_file.load(RECIPE)
    c.model.name = preset
    c.model.dtype = dtype
    c.model.param_dtype = "float32"
    for k, v in (overrides or {}).items():
        if k not in c.model:
            raise ValueError(f"--variants: {k!r} is not a model key; expected one of "
                             f"{sorted(c.model)}")  # fmt: skip
        c.model[k] = v
    c.batch_size = batch
    c.total_steps = None  # set by benchmark.prepare (`pretrain.plan_without_data`)
    return c


def parse_variants(text: str) -> list[dict]:
    """`"attention_impl=cudnn;attention_impl=xla,scan_layers=true"` -> one dict of model
    overrides per `;`-separated variant (`true`/`false` are booleans; an empty text is the
    recipe as it is)."""
    out = []
    for part in text.split(";"):
        v = {}
        for item in filter(None, (x.strip() for x in part.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--variants: {item!r} is not KEY=VALUE")
            low = value.strip().lower()
            v[key.strip()] = {"true": True, "false": False}.get(low, value.strip())
        out.append(v)
    return out


def batch_for(spec: str, name: str, preset: str) -> int:
    """The global batch of a model from `--batch`: one integer for every model, or
    `vit_base=256,vit_huge=128` (model names or presets; others take `default=N` or 256)."""
    spec = str(spec).strip()
    if "=" not in spec:
        return int(spec)
    table = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        table[key.strip()] = int(value)
    return table.get(name, table.get(preset, table.get("default", 256)))


def relative_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ------------------------------------------------------------------------------ PyTorch side
def torch_device(jax_device):
    """The PyTorch device matching the JAX one (CUDA for a GPU, else the CPU)."""
    import torch

    if jax_device.platform == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("JAX runs on a GPU but this torch has no CUDA: install a CUDA torch")
        return torch.device("cuda", 0)
    if jax_device.platform != "cpu":
        raise ValueError(f"the PyTorch side runs on CUDA or the CPU, not {jax_device.platform}")
    return torch.device("cpu")


def hf_model(hf_state: dict[str, np.ndarray], mcfg, device):
    """`ViTMAEForPreTraining` (SDPA attention) holding `hf_state` (our 'hf' export)."""
    import torch
    import transformers

    cfg = transformers.ViTMAEConfig(**convert.hf_config(mcfg), attn_implementation="sdpa")
    with torch.device("meta"):
        model = transformers.ViTMAEForPreTraining(cfg)
    # transformers' in-memory names -> the hub names our export uses
    names = mapping.normalize_hf_names({k: k for k in model.state_dict()})
    if set(names) != set(hf_state):
        raise ValueError(
            f"export and ViTMAEForPreTraining disagree on names: "
            f"{sorted(set(names) ^ set(hf_state))[:8]}"
        )
    sd = {names[k]: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf_state.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).train()


def torch_optimizer(model, oc, device):
    """AdamW as our optimizer config says; no decay on ndim <= 1 (norms, biases)."""
    import torch

    if oc.name != "adamw" or oc.get("layer_decay") or tuple(oc.get("no_decay_names") or ()):
        raise ValueError(
            f"the PyTorch side mirrors plain AdamW only; optimizer {oc.name!r}, layer_decay "
            f"{oc.get('layer_decay')}, no_decay_names {oc.get('no_decay_names')}"
        )
    train = [p for p in model.parameters() if p.requires_grad]  # not the fixed pos tables
    groups = [
        {"params": [p for p in train if p.ndim > 1], "weight_decay": float(oc.weight_decay)},
        {"params": [p for p in train if p.ndim <= 1], "weight_decay": 0.0},
    ]
    kw = dict(lr=optim.peak_learning_rate(oc), betas=(oc.b1, oc.b2), eps=oc.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, ValueError):  # no fused kernel for this device
        return torch.optim.AdamW(groups, foreach=device.type == "cuda", **kw), "unfused"


def torch_loss_and_mask(model, images, noise):
    """float32 forward at full matmul precision: (loss, mask) as numpy."""
    import torch

    old = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            out = model(pixel_values=images, noise=noise)
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cudnn.allow_tf32 = old[1]
    return float(out.loss), out.mask.float().cpu().numpy()


def run_torch(
    model, images, noise, *, oc, dtype, compile_, steps, warmup, peak, flops_per_image, device
) -> dict:
    """Time the PyTorch train step like `benchmark.run` times ours; every figure as a dict."""
    import torch

    cuda = device.type == "cuda"
    if cuda:  # JAX's default float32 matmuls on GPUs use TF32; match it
        torch.set_float32_matmul_precision("high")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    opt, fused = torch_optimizer(model, oc, device)
    clip = oc.get("grad_clip_norm")
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.compile(model, dynamic=False) if compile_ else model
    amp = dtype == "bfloat16"

    def step():
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            loss = fwd(pixel_values=images, noise=noise).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    compile_error = None
    try:
        loss = step()
    except Exception as e:  # noqa: BLE001 - torch.compile refused the model: time it eager
        if not compile_:
            raise
        compile_error = f"{type(e).__name__}: {str(e)[:500]}"
        print(f"torch.compile failed ({compile_error}); PyTorch runs eager", flush=True)
        fwd, compile_ = model, False
        opt.zero_grad(set_to_none=True)
        loss = step()
    sync()
    first_call = time.perf_counter() - t0
    first_loss = float(loss)
    for _ in range(warmup):
        loss = step()
    sync()
    times = []
    cpu0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    cpu_per_step = (time.process_time() - cpu0) / steps
    batch = images.shape[0]
    result = {
        "implementation": "transformers ViTMAEForPreTraining (sdpa)",
        "compiled": bool(compile_),
        "compile_error": compile_error,
        "autocast": "bfloat16" if amp else None,
        "adamw": fused,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "step_times_s": times,
        "first_call_s": first_call,
        "process_cpu_s_per_step": cpu_per_step,
        "flops_per_image": flops_per_image,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "n/a on the CPU",
        "first_loss": first_loss,
        "final_loss": float(loss),
    }
    result.update(benchmark.throughput(times, batch, flops_per_image, 1, peak))
    return result


# ------------------------------------------------------------------------------ our side
def step0_noise(key, batch: int, num_patches: int) -> jax.Array:
    """The masking noise our train step draws at step 0 (`pretrain.mae_step`)."""
    return jax.random.uniform(jax.random.fold_in(key, 0), (batch, num_patches), jnp.float32)


def our_loss_and_mask(prepared, mcfg, images, noise):
    """Our float32 loss (full matmul precision) at the initial state: (loss, mask)."""
    # cuDNN's flash attention takes half precision only: float32 goes through XLA's.
    impl = None if mcfg.attention_impl == "cudnn" else mcfg.attention_impl
    cfg32 = dataclasses.replace(mcfg, dtype="float32", attention_impl=impl)
    graphdef = nnx.split(nnx.eval_shape(lambda: models.create(cfg32)), nnx.Param, ...)[0]

    def f(params, rest, x, z):
        out = nnx.merge(graphdef, params, rest)(x, noise=z)
        return out.loss, out.mask

    with jax.default_matmul_precision("highest"):
        loss, mask = jax.jit(f)(prepared.state["params"], prepared.fns.rest, images, noise)
    return float(loss), np.asarray(mask, np.float32)


def export_hf(prepared, mcfg) -> dict[str, np.ndarray]:
    """The initial state's weights (and fixed position tables) in Hugging Face naming."""
    params = jax.device_get(nnx.to_pure_dict(prepared.state["params"]))
    rest = jax.device_get(nnx.to_pure_dict(prepared.fns.rest))
    return convert.params_to_pytorch(
        params,
        mcfg,
        "hf",
        pos_embed=rest.get("pos_embed"),
        decoder_pos_embed=rest.get("decoder_pos_embed"),
    )


# ------------------------------------------------------------------------------ one model
def compare(name: str, args, device, variants: list[dict]) -> dict:
    """Parity check, then our step in each of `variants` (model overrides) and the PyTorch
    step, timed, for one model. A variant that fails (e.g. out of memory) is recorded with its
    error and the others go on; the fastest variant is the one compared."""
    import torch

    preset = resolve_model(name)
    batch = batch_for(args.batch, name, preset)
    steps_total = 1 + args.warmup + args.steps
    config = make_config(preset, args.dtype, batch, variants[0])
    prepared = benchmark.prepare(config, steps_total, devices=[device])
    mcfg = prepared.plan.model
    tdev = torch_device(device)
    model = hf_model(export_hf(prepared, mcfg), mcfg, tdev)
    n_ours = sum(x.size for x in jax.tree.leaves(prepared.state["params"]))
    n_torch = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_ours != n_torch:
        raise ValueError(f"{preset}: {n_ours} trainable parameters here, {n_torch} in PyTorch")

    images = prepared.batch["image"]
    noise = step0_noise(prepared.key, batch, mcfg.num_patches)
    t_images = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()).to(tdev)
    t_noise = torch.from_numpy(np.array(noise)).to(tdev)

    ours_loss, ours_mask = our_loss_and_mask(prepared, mcfg, images, noise)
    theirs_loss, theirs_mask = torch_loss_and_mask(model, t_images, t_noise)
    rel = relative_diff(ours_loss, theirs_loss)
    same_mask = bool(np.array_equal(ours_mask, theirs_mask))
    parity = {
        "ours_loss": ours_loss,
        "pytorch_loss": theirs_loss,
        "relative_diff": rel,
        "tolerance": args.parity_tol,
        "masks_identical": same_mask,
        "passed": same_mask and rel <= args.parity_tol,
    }
    print(
        f"\n== {preset}: batch {batch}, {args.dtype} ==\n"
        f"parity (float32 loss of the first step, same weights, images and noise): ours "
        f"{ours_loss:.7f}, PyTorch {theirs_loss:.7f}, relative difference {rel:.2e} (tolerance "
        f"{args.parity_tol:g}), masks {'identical' if same_mask else 'DIFFERENT'}: "
        f"{'PASS' if parity['passed'] else 'FAIL'}",
        flush=True,
    )
    if not parity["passed"]:
        raise ParityError(
            {"model": preset, "parity": parity},
            f"{preset}: the two sides disagree (loss {ours_loss!r} vs {theirs_loss!r}, relative "
            f"difference {rel:.3e} > {args.parity_tol:g}, masks identical: {same_mask})",
        )

    peak = args.peak_tflops if args.peak_tflops is not None else flops.peak_tflops(device)
    oc = prepared.plan.run.optim
    tried = []
    for i, variant in enumerate(variants):
        vconfig = make_config(preset, args.dtype, batch, variant)
        if i:
            prepared = benchmark.prepare(vconfig, steps_total, devices=[device])
        profile_dir = None
        if args.profile_dir and name == args.models[0]:
            profile_dir = os.path.join(args.profile_dir, f"{name}_{variant_label(variant)}")
        try:
            r = benchmark.run(
                vconfig,
                steps=args.steps,
                warmup=args.warmup,
                peak_tflops=peak,
                prepared=prepared,
                profile_steps=args.profile_steps if profile_dir else 0,
                profile_dir=profile_dir,
            )
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, try the next
            r = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        r["variant"] = variant
        tried.append(r)
        print(f"ours [{variant_label(variant)}]: {describe_variant_result(r)}", flush=True)
        if profile_dir and "error" not in r:
            print(describe_profile(r, profile_dir), flush=True)
        prepared = None
        gc.collect()
    done = [r for r in tried if "error" not in r]
    if not done:
        raise RuntimeError(f"{preset}: every variant of our step failed: {tried}")
    ours = max(done, key=lambda r: r["images_per_sec"])
    compile_ = args.compile if args.compile is not None else tdev.type == "cuda"
    theirs = run_torch(
        model,
        t_images,
        t_noise,
        oc=oc,
        dtype=args.dtype,
        compile_=compile_,
        steps=args.steps,
        warmup=args.warmup,
        peak=peak,
        flops_per_image=ours["flops_per_image"],
        device=tdev,
    )
    del model, t_images, t_noise
    gc.collect()
    if tdev.type == "cuda":
        torch.cuda.empty_cache()
    out = {
        "model": preset,
        "batch": batch,
        "dtype": args.dtype,
        "parity": parity,
        "ours": ours,
        "ours_variants": tried,
        "pytorch": theirs,
        "ratio_images_per_sec": ours["images_per_sec"] / theirs["images_per_sec"],
    }
    print(format_table(out), flush=True)
    return out


def describe_profile(r: dict, profile_dir: str, n: int = 15) -> str:
    """The trace's top `n` device ops (`profiler.top_ops`), kept in `r["top_ops"]`."""
    traces = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"),
                              recursive=True))  # fmt: skip
    if not traces:
        return f"profile: no perfetto_trace.json.gz under {profile_dir}"
    where, rows = profiler.top_ops(traces[-1], n)
    r["top_ops"], r["profile_trace"] = rows, traces[-1]
    lines = [f"profile {traces[-1]} ({', '.join(where)}): top {len(rows)} ops by time"]
    lines += [
        f"  {x['share'] * 100:5.1f}%  {x['total_ms']:9.2f} ms  x{x['count']:<5} {x['name'][:100]}"
        for x in rows
    ]
    return "\n".join(lines)


def variant_label(variant: dict) -> str:
    """`{'attention_impl': 'xla', 'scan_layers': True}` -> `attention_impl=xla,scan_layers=True`."""
    return ",".join(f"{k}={v}" for k, v in variant.items()) or "recipe"


def describe_variant_result(r: dict) -> str:
    if "error" in r:
        return f"FAILED ({r['error'][:200]})"
    return (
        f"{r['images_per_sec']:.1f} images/s, MFU {_pct(r['mfu'])}, step "
        f"{r['step_time_median_s'] * 1e3:.1f} ms, first call {r['first_call_s']:.1f} s, peak "
        f"memory {_gib(r['peak_memory_bytes'])} GiB"
    )


def summary_table(results: list[dict]) -> str:
    """One line per model: ours, PyTorch, the ratio, MFU and our fastest settings."""
    lines = [
        "\nmodel                  batch  ours img/s (MFU)    PyTorch img/s (MFU)  ratio  "
        "compile s ours/torch  peak GiB ours/torch  our settings"
    ]
    for r in results:
        if "ours" not in r:
            lines.append(f"{r['model']:<22} {r.get('error') or 'parity failed'}")
            continue
        a, b = r["ours"], r["pytorch"]
        lines.append(
            f"{r['model']:<22} {r['batch']:>5}  {a['images_per_sec']:>9.1f} ({_pct(a['mfu']):>6})"
            f"  {b['images_per_sec']:>10.1f} ({_pct(b['mfu']):>6})  {r['ratio_images_per_sec']:>5.2f}"
            f"  {a['first_call_s']:>8.1f}/{b['first_call_s']:<8.1f}   "
            f"{_gib(a['peak_memory_bytes']):>6}/{_gib(b['peak_memory_bytes']):<6}      "
            f"remat={a['remat']} attention={a['attention_impl']} "
            f"scan={a.get('scan_layers')}"
        )
    return "\n".join(lines)


def _gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}%"


def format_table(r: dict) -> str:
    """Both sides' figures, one row each, and the ratio."""
    a, b = r["ours"], r["pytorch"]
    torch_name = "PyTorch" + (" compiled" if b["compiled"] else " eager")
    rows = [
        ("images/s", f"{a['images_per_sec']:.2f}", f"{b['images_per_sec']:.2f}"),
        (
            "step time median (ms)",
            f"{a['step_time_median_s'] * 1e3:.1f}",
            f"{b['step_time_median_s'] * 1e3:.1f}",
        ),
        (
            "step time min/max (ms)",
            f"{a['step_time_min_s'] * 1e3:.0f}/{a['step_time_max_s'] * 1e3:.0f}",
            f"{b['step_time_min_s'] * 1e3:.0f}/{b['step_time_max_s'] * 1e3:.0f}",
        ),
        ("model TFLOP/s", f"{a['model_tflops']:.4g}", f"{b['model_tflops']:.4g}"),
        ("MFU", _pct(a["mfu"]), _pct(b["mfu"])),
        ("first step, compile (s)", f"{a['first_call_s']:.2f}", f"{b['first_call_s']:.2f}"),
        ("peak memory (GiB)", _gib(a["peak_memory_bytes"]), _gib(b["peak_memory_bytes"])),
        (
            "CPU-s per step",
            f"{a['process_cpu_s_per_step']:.2f}",
            f"{b['process_cpu_s_per_step']:.2f}",
        ),
        ("first/final loss", f"{a['first_loss']:.4f}/{a['final_loss']:.4f}",
         f"{b['first_loss']:.4f}/{b['final_loss']:.4f}"),
    ]  # fmt: skip
    w = max(len(k) for k, _, _ in rows)
    lines = [f"{'':{w}}  {'ours (JAX)':>16}  {torch_name:>18}"]
    lines += [f"{k:{w}}  {x:>16}  {y:>18}" for k, x, y in rows]
    peak = a["peak_tflops_per_device"]
    lines += [
        f"ours: XLA compile {a['xla_compile_s']:.2f} s (trace {a['trace_s']:.2f} s, lower "
        f"{a['lower_s']:.2f} s); memory: {a['peak_memory_kind']}",
        f"PyTorch: AdamW {b['adamw']}, autocast {b['autocast'] or 'off'}, {b['torch_threads']} "
        f"threads; memory: {b['peak_memory_kind']}",
        "MFU against "
        + ("n/a (peak unknown; pass --peak_tflops)" if peak is None else f"{peak:g} TFLOP/s")
        + f" per device; {a['flops_per_image'] / 1e9:.4g} GFLOP per image per step",
        f"first-step loss in the timed runs ({r['dtype']}): relative difference "
        f"{relative_diff(a['first_loss'], b['first_loss']):.2e}",
        f"ratio ours/PyTorch: images/s {r['ratio_images_per_sec']:.3f}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI
def environment(device) -> dict:
    import torch
    import transformers

    return {
        "jax_device": f"{device.device_kind} ({device.platform})",
        "jax_devices_visible": jax.device_count(),
        "torch_cuda": torch.version.cuda,
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
            "flax": _version("flax"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "loadavg": _loadavg(),
    }


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vit_base,vit_large", help="comma-separated")
    ap.add_argument(
        "--batch",
        default="256",
        help="global batch: N for every model, or per model: vit_base=256,vit_huge=128",
    )
    ap.add_argument(
        "--variants",
        default="",
        help="our step's model overrides to time, ';'-separated, e.g. "
        "'attention_impl=cudnn;attention_impl=xla;attention_impl=cudnn,scan_layers=true' "
        "(default: the recipe's settings); the fastest is compared with PyTorch",
    )
    ap.add_argument(
        "--sweep_models",
        default=None,
        help="models whose variants are all timed (default: the first model); the others "
        "run the fastest variant of the last swept model",
    )
    ap.add_argument("--profile_dir", default=None, help="trace our first model's variants here")
    ap.add_argument("--profile_steps", type=int, default=3, help="steps traced per variant")
    ap.add_argument("--dtype", default="bfloat16", help=f"compute dtype: {' or '.join(DTYPES)}")
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the PyTorch model (default: on for CUDA, off on the CPU)",
    )
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    ap.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU")
    ap.add_argument("--parity_tol", type=float, default=PARITY_TOL, help="relative loss tolerance")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    args = ap.parse_args(argv)
    if args.dtype not in DTYPES:
        ap.error(f"--dtype {args.dtype!r} is not one of {DTYPES}")
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        ap.error(f"--peak_tflops must be positive, got {args.peak_tflops}")
    if not args.parity_tol > 0:
        ap.error(f"--parity_tol must be positive, got {args.parity_tol}")
    if args.profile_steps < 1:
        ap.error(f"--profile_steps must be >= 1, got {args.profile_steps}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    sweep = args.sweep_models
    args.sweep_models = args.models[:1] if sweep is None else [m.strip() for m in sweep.split(",")]
    try:
        for m in args.models:
            if batch_for(args.batch, m, resolve_model(m)) <= 0:
                raise ValueError(f"--batch must be positive, got {args.batch!r}")
        args.variants = parse_variants(args.variants)
        for v in args.variants:
            make_config(resolve_model(args.models[0]), args.dtype, 1, v)
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; 0 on success, 1 when a parity check fails."""
    args = parse_args(argv)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"error: the PyTorch side needs torch and transformers ({e})", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    env = environment(device)
    v = env["versions"]
    print(
        f"device: JAX {env['jax_device']} (1 of {env['jax_devices_visible']} visible), "
        f"PyTorch {torch_device(device)}; host {env['host']}\n"
        f"versions: jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, python {v['python']}\n"
        f"load average (/proc/loadavg): {env['loadavg']}",
        flush=True,
    )
    results, status, variants = [], 0, args.variants

    def save():  # after every model, so a run cut short keeps what it measured
        env["loadavg_end"] = _loadavg()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": env, "results": results}, f, indent=2)

    for name in args.models:
        swept = name in args.sweep_models
        try:
            results.append(compare(name, args, device, variants if swept else variants[:1]))
            if swept:  # the fastest first: the models after run it
                variants = [results[-1]["ours"]["variant"]]
        except ParityError as e:
            print(f"PARITY CHECK FAILED: {e}", file=sys.stderr, flush=True)
            results.append(e.record)
            save()
            return 1
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the next model still runs
            print(f"{name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            results.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
            status = 1
        save()
    print(f"\nload average at the end: {env['loadavg_end']}", flush=True)
    if len(results) > 1:
        print(summary_table(results), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
