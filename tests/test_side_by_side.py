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


def test_tiny_run_prints_both_sides_and_passes_parity(sbs, tmp_path, capsys):
    out_json = tmp_path / "sbs.json"
    args = ["--models=mae_vit_test", "--batch=4", "--dtype=float32", "--steps=2", "--warmup=1"]
    assert sbs.main([*args, "--peak_tflops=0.5", f"--json={out_json}"]) == 0
    text = capsys.readouterr().out
    assert "masks identical: PASS" in text
    for label in ("images/s", "step time median (ms)", "model TFLOP/s", "MFU",
                  "first step, compile (s)", "peak memory (GiB)", "ratio ours/PyTorch",
                  "load average", "transformers"):  # fmt: skip
        assert label in text, (label, text)
    r = json.loads(out_json.read_text())["results"][0]
    assert r["model"] == "mae_vit_test" and r["parity"]["passed"]
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
    args = ["--models=mae_vit_test", "--batch=2", "--steps=1", "--warmup=0"]
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
    ],
)
def test_bad_arguments_are_named(sbs, argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        sbs.main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err
