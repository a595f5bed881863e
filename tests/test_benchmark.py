"""Benchmark (throughput, MFU) and AOT compile check: arithmetic, CLI runs on the CPU, errors."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from config_files import ROOT, load_config

from mae_jax import aot, benchmark, flops, models
from mae_jax import sharding as shd
from mae_jax.tasks import pretrain


def tiny_config(batch=16, **mesh):
    c = load_config()
    c.model.name = "mae_vit_test"
    c.batch_size = batch
    c.total_steps = None
    if mesh:
        c.mesh.update(mesh)
    return c


def run_module(args, devices=2, timeout=300):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------ arithmetic
def hand_count_vit_b16() -> float:
    """Model FLOPs of one ViT-B/16 MAE training step per image, counted by hand.

    Matrix products only (multiply-add = 2), backward = 2 x forward. L = 196 patches, 49 kept
    (+ cls = 50 encoder tokens), decoder on 197 tokens. A block on T tokens of width D with
    MLP 4D: qkv 6TD^2 + proj 2TD^2 + MLP 16TD^2 = 24TD^2, plus QK^T and AV 4T^2D.
    """
    block = lambda t, d: 24 * t * d * d + 4 * t * t * d  # noqa: E731
    fwd = (
        2 * 196 * 768 * 768  # patch embedding (on all patches, as the conv)
        + 12 * block(50, 768)  # encoder
        + 2 * 50 * 768 * 512  # decoder_embed
        + 8 * block(197, 512)  # decoder
        + 2 * 197 * 512 * 768
    )  # decoder_pred
    return 3.0 * fwd


def test_hand_count_matches_reference_and_flops_module():
    hand = hand_count_vit_b16()
    assert hand == pytest.approx(58.7e9, rel=1e-3)
    cfg = models.resolve("mae_vit_base_patch16", mask_ratio=0.75)
    assert flops.mae_train_flops_per_image(cfg) == pytest.approx(hand, rel=1e-12)


def test_mfu_arithmetic_vit_b16():
    hand = hand_count_vit_b16()
    # 256 images in 0.256 s = 1000 images/s on one H100 (peak 800 TFLOP/s).
    r = benchmark.throughput([0.256, 0.256, 0.256], 256, hand, num_devices=1, peak_tflops=800)
    assert r["images_per_sec"] == pytest.approx(1000.0)
    assert r["model_tflops"] == pytest.approx(1000 * hand / 1e12)
    assert r["mfu"] == pytest.approx(1000 * hand / 800e12)
    assert r["mfu"] == pytest.approx(0.0734, abs=5e-4)
    # The same rate spread over 8 devices is an eighth of the utilization.
    r8 = benchmark.throughput([0.256], 256, hand, num_devices=8, peak_tflops=800)
    assert r8["mfu"] == pytest.approx(r["mfu"] / 8)
    assert r8["images_per_sec_per_device"] == pytest.approx(125.0)
    assert benchmark.throughput([0.256], 256, hand, 1, None)["mfu"] is None


def test_step_time_statistics():
    times = [0.5, 0.1, 0.2, 0.3, 0.4]
    r = benchmark.throughput(times, 10, 1e9, 1, None)
    assert r["step_time_median_s"] == pytest.approx(0.3)
    assert (r["step_time_min_s"], r["step_time_max_s"]) == (0.1, 0.5)
    assert r["step_time_p10_s"] == pytest.approx(np.percentile(times, 10))
    assert r["step_time_p90_s"] == pytest.approx(np.percentile(times, 90))
    assert r["images_per_sec"] == pytest.approx(10 / 0.3)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(step_times_s=[]), "step time"),
        (dict(step_times_s=[0.0]), "step time"),
        (dict(batch_size=0), "batch_size"),
        (dict(peak_tflops=-1.0), "peak_tflops"),
    ],
)
def test_throughput_rejects_bad_values(kw, match):
    args = dict(
        step_times_s=[0.1], batch_size=8, flops_per_image=1e9, num_devices=1, peak_tflops=None
    )
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        benchmark.throughput(**args)


def test_report_says_na_without_peak():
    r = dict(
        benchmark.throughput([0.2, 0.3], 8, 1e9, 1, None),
        model="m",
        dtype="float32",
        param_dtype="float32",
        remat=False,
        attention_impl=None,
        global_batch=8,
        grad_accum_steps=1,
        mesh={"data": 1},
        num_devices=1,
        device_kind="cpu",
        backend="cpu",
        jax_version=jax.__version__,
        first_call_s=1.0,
        trace_s=0.1,
        lower_s=0.1,
        xla_compile_s=0.5,
        process_cpu_s_per_step=0.4,
        load_average_1min=1.0,
        steps=2,
        warmup=1,
        flops_per_image=1e9,
        peak_memory_bytes=2**30,
        peak_memory_kind="process max RSS",
        final_loss=1.0,
    )
    text = benchmark.format_report(r)
    assert "MFU: n/a (peak unknown; pass --peak_tflops)" in text
    text = benchmark.format_report(dict(r, mfu=0.5, peak_tflops_per_device=800.0))
    assert "MFU: 50.00% (peak 800 TFLOP/s per device)" in text


def test_peak_memory_falls_back_to_rss_on_cpu():
    nbytes, what = benchmark.peak_memory(jax.devices()[:2])
    assert nbytes > 50 * 2**20 and "RSS" in what


def test_no_tensorflow_at_import():
    code = (
        "import sys, mae_jax.benchmark, mae_jax.aot; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]


# ------------------------------------------------------------------------------ benchmark CLI
LABELS = (
    "model:",
    "global batch:",
    "device:",
    "compile: first call",
    "step time: median",
    "host:",
    "images/s:",
    "model TFLOP/s:",
    "MFU:",
    "memory:",
    "final loss:",
)


def test_benchmark_cli_rejects_indivisible_batch():
    res = run_module(
        [
            "mae_jax.benchmark",
            "--config=configs/smoke.py",
            "--config.model.name=mae_vit_test",
            "--config.batch_size=3",
        ]
    )
    assert res.returncode == 2
    assert "config.batch_size=3 is not divisible" in res.stderr


def test_benchmark_rejects_bad_step_counts():
    with pytest.raises(ValueError, match="--steps"):
        benchmark.run(tiny_config(), steps=0)
    with pytest.raises(ValueError, match="--warmup"):
        benchmark.run(tiny_config(), warmup=-1)


# ------------------------------------------------------------------------------ AOT
@pytest.mark.parametrize(
    "name,chips,grid,hbm",
    [
        ("v4-8", 4, (2, 2, 1), 32.0),
        ("v4-32", 16, (2, 2, 4), 32.0),
        ("v5p-64", 32, (2, 4, 4), 95.0),
        ("v4-128", 64, (4, 4, 4), 32.0),
        ("v5e-16", 16, (4, 4), 16.0),
        ("v5litepod-8", 8, (2, 4), 16.0),
        ("v6e-256", 256, (16, 16), 32.0),
        ("h100-8", 8, (), 80.0),
    ],
)
def test_parse_topology(name, chips, grid, hbm):
    t = aot.parse_topology(name)
    assert (t.num_devices, t.shape, t.hbm_gib) == (chips, grid, hbm)


@pytest.mark.parametrize(
    "name,match",
    [
        ("v9-32", "unknown accelerator"),
        ("tpu", "unknown topology"),
        ("v4-12", "power of two"),
        ("v4-4", "power of two"),
        ("v5e-2", "counts chips"),
        ("", "unknown topology"),
    ],
)
def test_parse_topology_rejects_bad_names(name, match):
    with pytest.raises(ValueError, match=match):
        aot.parse_topology(name)


def test_memory_report_arithmetic():
    fake = types.SimpleNamespace(
        memory_analysis=lambda: types.SimpleNamespace(
            argument_size_in_bytes=10 * aot.GIB,
            output_size_in_bytes=10 * aot.GIB,
            alias_size_in_bytes=9 * aot.GIB,
            temp_size_in_bytes=5 * aot.GIB,
            generated_code_size_in_bytes=0,
        )
    )
    r = aot.memory_report(fake, hbm_gib=16.0)
    assert r["total_bytes"] == 16 * aot.GIB and r["fits"] and r["fraction_of_hbm"] == 1.0
    assert not aot.memory_report(fake, hbm_gib=15.9)["fits"]


@pytest.mark.slow
def test_aot_program_is_the_training_step():
    """The AOT-lowered program, run on real CPU arrays, gives what training's step gives. The
    parameters sharded (fsdp): arrays laid out as training lays them out must be accepted. The
    mesh and batch of test_knn_monitor's run, so the session's compilation cache serves the
    step."""
    config = tiny_config(batch=16, data=2, fsdp=4)
    mesh = shd.make_mesh(config.mesh)
    lowered, p = aot.lower_train_step(config, mesh)
    compiled = lowered.compile()
    fns = pretrain.step_fns(config, p, mesh)
    images = jax.device_put(
        np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32),
        shd.batch_sharding(mesh),
    )
    key = jax.random.key(3)
    s_ref, m_ref = fns.step(fns.init(), {"image": images}, key)
    s_aot, m_aot = compiled(fns.init(), {"image": images}, key, fns.rest, fns.schedule)
    assert float(m_aot["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(s_aot["params"]), jax.tree.leaves(s_ref["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    r = aot.memory_report(compiled, 1.0)
    assert r["argument_bytes"] > 0 and r["temp_bytes"] > 0 and r["fits"]


@pytest.mark.slow
def test_benchmark_cli_runs_on_cpu_and_prints_every_figure(tmp_path):
    """A real process on 8 devices, `data=-1` resolved beside `fsdp=4`: the mesh and batch of the
    test above (and test_knn_monitor's run), so its step loads from the compilation cache."""
    out_json = tmp_path / "bench.json"
    res = run_module(
        [
            "mae_jax.benchmark",
            "--config=configs/smoke.py",
            "--config.model.name=mae_vit_test",
            "--config.batch_size=16",
            "--config.mesh.fsdp=4",
            "--steps=3",
            "--warmup=1",
            "--peak_tflops=0.5",
            f"--json={out_json}",
        ],
        devices=8,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for label in LABELS:
        assert label in res.stdout, (label, res.stdout)
    r = json.loads(out_json.read_text())
    assert r["model"] == "mae_vit_test" and r["backend"] == "cpu"
    assert r["num_devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert len(r["step_times_s"]) == 3 and r["images_per_sec"] > 0
    assert r["step_time_min_s"] <= r["step_time_median_s"] <= r["step_time_max_s"]
    assert r["xla_compile_s"] > 0 and r["first_call_s"] >= r["xla_compile_s"]
    model = load_config().model
    model.name = "mae_vit_test"
    assert r["flops_per_image"] == flops.mae_train_flops_per_image(models.resolve(model))
    assert r["mfu"] == pytest.approx(
        r["images_per_sec"] * r["flops_per_image"] / 8 / 0.5e12, rel=1e-9
    )
    assert f"{100 * r['mfu']:.2f}%" in res.stdout
    assert r["peak_memory_bytes"] > 0 and "RSS" in r["peak_memory_kind"]
    assert r["process_cpu_s_per_step"] > 0
    assert np.isfinite(r["final_loss"])


@pytest.mark.slow  # the preflight's model check or an AOT compile of a stand-in topology
def test_aot_check_cpu_stand_in_reports_memory_and_counts_micro_batches():
    """One compile: a stand-in topology, `data=-1` resolved on its devices, and the per-device
    batch of one micro-step (32 images, 2 micro-steps, 8 data-parallel devices: 2)."""
    accum = tiny_config(batch=32, data=-1, fsdp=2)
    accum.grad_accum_steps = 2
    report = aot.check(accum, "v5e-8", backend="cpu")
    assert report["compiled_for_backend"] == "cpu" and report["stand_in"]
    assert report["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert report["per_device_batch"] == 2 and report["grad_accum_steps"] == 2
    assert report["fits"]
    assert 0 < report["total_bytes"] < report["hbm_bytes"] == 16 * aot.GIB
    text = aot.format_report(report)
    assert "stand-in compile" in text and "FITS" in text and "v5e-8 = 8 x TPU v5 lite" in text
    over = dict(report, fits=False, fraction_of_hbm=1.5)
    assert "(150.0%) -> DOES NOT FIT" in aot.format_report(over)


def test_aot_check_rejects_bad_inputs():
    with pytest.raises(ValueError, match="not divisible"):
        aot.check(tiny_config(batch=12), "v5e-8", backend="cpu")
    with pytest.raises(ValueError, match="needs 16 cpu devices"):
        aot.check(tiny_config(batch=16), "v5e-16", backend="cpu")
    with pytest.raises(ValueError, match="TPU topology"):
        aot.check(tiny_config(batch=16), "v4-8", backend="gpu")


def test_aot_cli_errors():
    res = run_module(["mae_jax.aot", "--config=configs/smoke.py", "--topology=v7x-9"])
    assert res.returncode == 2 and "unknown accelerator 'v7x'" in res.stderr


@pytest.mark.slow
@pytest.mark.skipif(aot.find_libtpu() is None, reason="libtpu (TPU compiler) not installed")
def test_aot_cli_compiles_for_tpu_without_hardware(tmp_path):
    out_json = tmp_path / "aot.json"
    res = run_module(
        [
            "mae_jax.aot",
            "--config=configs/smoke.py",
            "--config.model.name=mae_vit_test",
            "--topology=v4-8",
            "--backend=tpu",
            f"--json={out_json}",
        ],
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled for backend: tpu (TPU v4)" in res.stdout and "FITS" in res.stdout
    r = json.loads(out_json.read_text())
    assert r["num_devices"] == 4 and not r["stand_in"] and r["mesh"]["data"] == 4
    assert r["argument_bytes"] > 0 and r["total_bytes"] < 32 * aot.GIB


@pytest.mark.parametrize("recipe", ["configs/mae_vit_base.py", "configs/mae_vit_huge.py"])
def test_the_paper_recipes_plan_without_a_data_set(recipe):
    # The recipes count warm-up and milestones in epochs; the benchmark and the AOT compile
    # read no data set.
    from mae_jax.tasks import pretrain

    p = pretrain.plan_without_data(load_config(recipe), 5)
    assert p.run.total_steps == 5 and p.run.warmup_steps == 0


def test_aot_names_an_out_of_memory_refusal_as_does_not_fit():
    from mae_jax import aot

    error = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (55.38G) exceeds available HBM (30.75G).\nmore detail"
    )
    text = aot.out_of_memory_message(error, "v4-32")
    assert "DOES NOT FIT" in text and "v4-32" in text and "(55.38G)" in text
    assert "more detail" not in text and "remat=full" in text
