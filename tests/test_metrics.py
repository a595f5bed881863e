"""Tests for mae_jax.metrics: JSON lines, TensorBoard events, console line, ETA."""

import glob
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import metrics


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _lines(workdir):
    with open(os.path.join(workdir, metrics.JSONL_NAME)) as f:
        return [json.loads(line) for line in f]


def _read_events(workdir):
    """{tag: [(step, value or tensor proto)]} from every event file in workdir."""
    import tensorflow as tf

    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v))
    return out


def test_format_eta():
    assert metrics.format_eta(0) == "0s"
    assert metrics.format_eta(45.4) == "45s"
    assert metrics.format_eta(192) == "3m12s"
    assert metrics.format_eta(2 * 3600 + 5 * 60 + 7) == "2h05m"
    assert metrics.format_eta(3 * 86400 + 4 * 3600) == "3d04h"
    assert metrics.format_eta(None) == "?"
    assert metrics.format_eta(float("inf")) == "?"
    assert metrics.format_eta(float("nan")) == "?"
    with pytest.raises(ValueError, match="-1"):
        metrics.format_eta(-1)


def test_jsonl_content_types_and_nonfinite(tmp_path):
    with metrics.MetricsWriter(tmp_path, tensorboard=False, console=False) as w:
        w.write_scalars(
            1,
            {
                "loss": np.float32(0.5),
                "lr": jnp.asarray(1e-4),
                "grad_norm": jnp.float32(1.25),
                "images_per_sec": 100.0,
                "count": np.int64(3),
                "n": 7,
            },
        )
        w.write_scalars(2, {"loss": float("nan"), "lr": np.inf, "grad_norm": -np.inf})
        # Visible before close: every line is flushed.
        lines = _lines(tmp_path)
    assert lines[0] == {
        "step": 1,
        "loss": 0.5,
        "lr": pytest.approx(1e-4),
        "grad_norm": 1.25,
        "images_per_sec": 100.0,
        "count": 3.0,
        "n": 7,
    }
    assert isinstance(lines[0]["loss"], float) and isinstance(lines[0]["count"], float)
    assert lines[1] == {"step": 2, "loss": "nan", "lr": "inf", "grad_norm": "-inf"}
    assert math.isnan(float(lines[1]["loss"])) and float(lines[1]["grad_norm"]) == -math.inf
    # Strict JSON (no NaN/Infinity tokens).
    raw = open(tmp_path / metrics.JSONL_NAME).read()
    assert "NaN" not in raw and "Infinity" not in raw
    assert metrics.read_jsonl(tmp_path) == lines


def test_bad_scalars_rejected(tmp_path):
    with metrics.MetricsWriter(tmp_path, tensorboard=False, console=False) as w:
        with pytest.raises(ValueError, match="'loss'"):
            w.write_scalars(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError, match="'name'"):
            w.write_scalars(1, {"name": "abc"})
        with pytest.raises(ValueError, match="step"):
            w.write_scalars(1, {"step": 3})
        with pytest.raises(ValueError, match="step"):
            w.write_scalars(-2, {"loss": 1.0})
    assert _lines(tmp_path) == []


def test_appends_across_writers_and_truncate_after(tmp_path):
    with metrics.MetricsWriter(tmp_path, tensorboard=False, console=False) as w:
        for step in range(0, 50, 10):
            w.write_scalars(step, {"loss": float(step)})
    # A kill mid-write can leave a torn last line.
    with open(tmp_path / metrics.JSONL_NAME, "a") as f:
        f.write('{"step": 50, "lo')
    assert [r["step"] for r in metrics.read_jsonl(tmp_path)] == [0, 10, 20, 30, 40]

    # Resume from a checkpoint at step 20: later lines (and the torn one) are dropped.
    assert metrics.truncate_after(tmp_path, 20) == 3
    assert [r["step"] for r in _lines(tmp_path)] == [0, 10, 20]
    assert metrics.truncate_after(tmp_path, 20) == 0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with metrics.MetricsWriter(tmp_path, tensorboard=False, console=False) as w:
        w.write_scalars(30, {"loss": 3.0})
    assert [r["step"] for r in _lines(tmp_path)] == [0, 10, 20, 30]
    assert metrics.truncate_after(tmp_path / "missing", 5) == 0


def test_console_line_and_eta(tmp_path, capsys):
    clock = FakeClock()
    w = metrics.MetricsWriter(tmp_path, total_steps=1000, tensorboard=False, clock=clock)
    w.write_scalars(100, {"loss": 0.81234, "lr": 1.2e-4, "images_per_sec": 312.44})
    clock.t = 10.0  # 100 steps in 10 s -> 10 steps/s; 800 steps left -> 80 s.
    w.write_scalars(200, {"loss": 0.5, "lr": 1.5e-4, "images_per_sec": 400.0})
    clock.t = 30.0  # 100 steps in 20 s -> 5 steps/s; EMA 0.8*10 + 0.2*5 = 9.
    w.write_scalars(300, {"loss": 0.4})
    w.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "step 100/1000  loss 0.8123  lr 1.2e-04  312.4 img/s  ETA ?"
    assert out[1] == "step 200/1000  loss 0.5000  lr 1.5e-04  400.0 img/s  ETA 1m20s"
    assert w.steps_per_sec == pytest.approx(9.0)
    assert out[2] == "step 300/1000  loss 0.4000  ETA 1m18s"  # 700 / 9 = 77.8 s.


def test_tensorboard_scalars_images_text(tmp_path):
    w = metrics.MetricsWriter(tmp_path, total_steps=10, console=False)
    assert w.tensorboard_enabled
    w.write_scalars(1, {"loss": 0.75, "lr": 1e-3})
    w.write_scalars(2, {"loss": 0.5, "lr": 2e-3})
    grid = np.zeros((2, 8, 8, 3), np.uint8)
    grid[1] = 255
    w.write_images(2, {"reconstruction": grid, "single": np.full((4, 6, 3), 0.5, np.float32)})
    w.write_config({"model": {"name": "mae_vit_tiny"}, "lr": 1e-4})
    w.write_text(3, {"note": "hello"})
    w.close()
    import tensorflow as tf

    events = _read_events(tmp_path)
    loss = [(s, float(tf.make_ndarray(v.tensor))) for s, v in events["loss"]]
    assert loss == [(1, 0.75), (2, 0.5)]
    assert [s for s, _ in events["lr"]] == [1, 2]
    ((step, img),) = events["reconstruction"]
    # Image summaries hold [width, height, png_1, ..., png_N] strings.
    strings = tf.make_ndarray(img.tensor)
    assert step == 2 and len(strings) == 2 + 2 and strings[:2].tolist() == [b"8", b"8"]
    decoded = tf.io.decode_png(strings[3]).numpy()
    assert decoded.shape == (8, 8, 3) and (decoded == 255).all()
    ((_, single),) = events["single"]
    assert tf.make_ndarray(single.tensor)[:2].tolist() == [b"6", b"4"]
    ((step, cfg),) = events["config"]
    text = tf.make_ndarray(cfg.tensor).item().decode()
    assert step == 0 and "mae_vit_tiny" in text and text.startswith("    ")
    ((step, note),) = events["note"]
    assert step == 3 and tf.make_ndarray(note.tensor).item() == b"hello"


def test_tensorboard_readable_by_event_accumulator(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    with metrics.MetricsWriter(tmp_path, console=False) as w:
        for step in range(3):
            w.write_scalars(step, {"loss": 1.0 / (step + 1)})
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    import tensorflow as tf

    values = [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors("loss")]
    assert values == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]


def test_bad_images_rejected(tmp_path):
    with metrics.MetricsWriter(tmp_path, console=False, tensorboard=False) as w:
        with pytest.raises(ValueError, match="'img'.*shape"):
            w.write_images(0, {"img": np.zeros((8, 8), np.uint8)})
        with pytest.raises(ValueError, match="'img'.*int32"):
            w.write_images(0, {"img": np.zeros((8, 8, 3), np.int32)})


def test_non_primary_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    w = metrics.MetricsWriter(workdir, is_primary=False, total_steps=10)
    w.write_scalars(1, {"loss": 0.5, "images_per_sec": 10.0})
    w.write_images(1, {"r": np.zeros((4, 4, 3), np.uint8)})
    w.write_config({"a": 1})
    w.write_text(1, {"t": "x"})
    w.flush()
    w.close()
    assert not workdir.exists()
    assert capsys.readouterr().out == ""


def test_workdir_that_is_a_file_is_rejected(tmp_path):
    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        metrics.MetricsWriter(f, tensorboard=False)


def test_write_after_close_rejected(tmp_path):
    w = metrics.MetricsWriter(tmp_path, tensorboard=False, console=False)
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write_scalars(1, {"loss": 1.0})
