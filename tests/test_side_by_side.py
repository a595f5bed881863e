"""benchmarks/side_by_side.py on the CPU at a tiny size: both sides' figures and a passing
parity check (no timing assertions)."""

import importlib.util
import json
import os

import pytest
from config_files import ROOT

pytest.importorskip("torch")
pytest.importorskip("transformers")


def load_script():
    path = os.path.join(ROOT, "benchmarks", "side_by_side.py")
    spec = importlib.util.spec_from_file_location("side_by_side", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sbs():
    return load_script()


@pytest.mark.slow  # the whole benchmark, PyTorch side included
def test_tiny_run_prints_both_sides_and_passes_parity(sbs, tmp_path, capsys):
    out_json = tmp_path / "sbs.json"
    args = ["--models=mae_vit_test", "--batch=mae_vit_test=4,default=2", "--dtype=float32",
            "--steps=2", "--warmup=1", "--variants=attention_impl=xla;scan_layers=true",
            f"--profile_dir={tmp_path / 'prof'}", "--profile_steps=1"]  # fmt: skip
    assert sbs.main([*args, "--peak_tflops=0.5", f"--json={out_json}"]) == 0
    text = capsys.readouterr().out
    assert "masks identical: PASS" in text
    # Both variants of our step timed and profiled; the faster one is the one compared.
    assert "ours [attention_impl=xla]:" in text and "ours [scan_layers=True]:" in text
    assert text.count("top ") >= 2, text
    for label in ("images/s", "step time median (ms)", "model TFLOP/s", "MFU",
                  "first step, compile (s)", "peak memory (GiB)", "ratio ours/PyTorch",
                  "load average", "transformers"):  # fmt: skip
        assert label in text, (label, text)
    r = json.loads(out_json.read_text())["results"][0]
    assert r["model"] == "mae_vit_test" and r["parity"]["passed"] and r["batch"] == 4
    tried = r["ours_variants"]
    assert [v["variant"] for v in tried] == [{"attention_impl": "xla"}, {"scan_layers": True}]
    assert [v["scan_layers"] for v in tried] == [False, True]
    assert r["ours"] == max(tried, key=lambda v: v["images_per_sec"])
    assert all(v["top_ops"] and os.path.exists(v["profile_trace"]) for v in tried)
    assert r["parity"]["relative_diff"] <= r["parity"]["tolerance"]
    ours, theirs = r["ours"], r["pytorch"]
    for side in (ours, theirs):
        assert len(side["step_times_s"]) == 2 and side["images_per_sec"] > 0
        assert side["mfu"] > 0 and side["first_call_s"] > 0
    assert ours["num_devices"] == 1 and not theirs["compiled"]
    assert ours["flops_per_image"] == theirs["flops_per_image"]
    assert r["ratio_images_per_sec"] == pytest.approx(
        ours["images_per_sec"] / theirs["images_per_sec"]
    )
    # float32 on both sides: the timed runs' first steps see the same weights, images, noise.
    assert theirs["first_loss"] == pytest.approx(ours["first_loss"], rel=1e-4)


def test_parity_failure_exits_1_before_timing(sbs, capsys, monkeypatch):
    real = sbs.torch_loss_and_mask

    def off_by_a_permille(model, images, noise):
        loss, mask = real(model, images, noise)
        return loss * 1.001, mask

    monkeypatch.setattr(sbs, "torch_loss_and_mask", off_by_a_permille)
    # the model, batch, dtype and variant of the test above: its programs, from the cache
    model = ["--models=mae_vit_test", "--batch=4", "--dtype=float32"]
    args = [*model, "--variants=attention_impl=xla", "--steps=1", "--warmup=0"]
    assert sbs.main(args) == 1
    captured = capsys.readouterr()
    assert "PARITY CHECK FAILED" in captured.err and "images/s" not in captured.out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--models=vit_giant"], "unknown model 'vit_giant'"),
        (["--dtype=float16"], "--dtype 'float16' is not one of"),
        (["--steps=0"], "--steps must be >= 1"),
        (["--parity_tol=0"], "--parity_tol must be positive"),
        (["--variants=heads=3"], "'heads' is not a model key"),
        (["--variants=attention_impl"], "'attention_impl' is not KEY=VALUE"),
        (["--batch=vit_base=0"], "--batch must be positive"),
    ],
)
def test_bad_arguments_are_named(sbs, argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        sbs.main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_top_ops_sums_the_device_kernels_of_a_trace(tmp_path):
    """`profiler.top_ops` reads a perfetto trace: the device processes' events summed by name,
    largest first; the host's events are left out when a device process exists."""
    import gzip

    from mae_jax import profiler

    def x(pid, name, dur):
        return {"ph": "X", "pid": pid, "tid": 1, "ts": 0, "dur": dur, "name": name}

    meta = [{"ph": "M", "pid": p, "name": "process_name", "args": {"name": n}}
            for p, n in ((1, "/host:CPU"), (2, "/device:GPU:0"))]  # fmt: skip
    events = meta + [x(1, "PjitFunction(train)", 9000), x(2, "gemm", 300), x(2, "sdpa", 500),
                     x(2, "gemm", 400), x(2, "fusion", 100)]  # fmt: skip
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    where, rows = profiler.top_ops(str(path), n=2)
    assert where == ["/device:GPU:0"]
    assert [(r["name"], r["count"]) for r in rows] == [("gemm", 2), ("sdpa", 1)]
    assert rows[0]["total_ms"] == pytest.approx(0.7) and rows[0]["share"] == pytest.approx(7 / 13)
