"""Tests of mae_jax.data.pipeline on folders of mostly or only corrupt images, and (slow) a
training process on a folder of only corrupt images."""

import logging
import os
import re
import signal
import subprocess
import time

import ml_collections
import numpy as np
import pytest
from config_files import ROOT, main_command
from PIL import Image

from mae_jax import schema
from mae_jax.data import pipeline

CLASSES = ("cats", "dogs", "fish")
# Garbage of several kinds, all named *.jpg: text, random bytes, empty, a bare JPEG header.
_GARBAGE = (
    b"this is not an image" * 40,
    np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    b"",
    b"\xff\xd8\xff\xe0" + b"\x00" * 200,
)


def _write_bad(path, i):
    with open(path, "wb") as f:
        f.write(_GARBAGE[i % len(_GARBAGE)])


def _make_bad_folder(root, good_per_class, bad_per_class):
    """root/<class>/a_good_i.jpg (real JPEGs, listed first) + root/<class>/b_bad_i.jpg (garbage)."""
    rng = np.random.default_rng(1)
    for c in CLASSES:
        os.makedirs(os.path.join(root, c))
        for i in range(good_per_class):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, c, f"a_good_{i}.jpg"), quality=90)
        for i in range(bad_per_class):
            _write_bad(os.path.join(root, c, f"b_bad_{i}.jpg"), i)
    return root


@pytest.fixture(scope="module")
def all_bad(tmp_path_factory):
    return _make_bad_folder(str(tmp_path_factory.mktemp("all_bad")), 0, 6)


@pytest.fixture(scope="module")
def mostly_bad(tmp_path_factory):
    return _make_bad_folder(str(tmp_path_factory.mktemp("mostly_bad")), 1, 4)


def _cfg(path, **kw):
    cfg = schema.defaults(schema.DATA)
    cfg.update(source="folder", path=path, image_size=16, with_keys=True)
    cfg.update(kw)
    return cfg


_OPEN = []  # the iterators of the running test, closed after it (`_close_iterators`)


@pytest.fixture(autouse=True)
def _close_iterators():
    """Closes the test's iterators when it ends. Left to the garbage collector (they are held by
    the tracebacks of `pytest.raises`), tf.data's teardown of these pipelines over unreadable
    files blocked the worker for 20 s at the end of the file (measured: the garbage collection
    after the last test, with almost no CPU used)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def _iterator(kind, cfg, batch=4, **kw):
    make = {
        "pretrain": pipeline.create_pretrain_iterator,
        "train": pipeline.create_train_iterator,
        "eval": pipeline.create_eval_iterator,
    }[kind]
    seed = {} if kind == "eval" else {"seed": 0}
    _OPEN.append(make(cfg, batch, **seed, process_index=0, process_count=1, **kw))
    return _OPEN[-1]


@pytest.mark.parametrize("kind", ["pretrain", "train"])
def test_all_corrupt_folder_raises_input_error_naming_folder(all_bad, kind):
    it = _iterator(kind, _cfg(all_bad, max_consecutive_bad=5))
    start = time.monotonic()
    with pytest.raises(pipeline.InputError) as info:
        next(it)
    assert time.monotonic() - start < 60
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert repr(all_bad) in msg and "8 examples in a row" in msg
    assert "JPEG" in msg and "max_consecutive_bad" in msg and "\n" not in msg
    assert it.position == 2 and it.skipped == 8  # 5 in a row exceeded in batch 1 (of 4)
    ev = _iterator("eval", _cfg(all_bad, max_consecutive_bad=5), split="train")
    with pytest.raises(pipeline.InputError, match=re.escape(repr(all_bad))):
        list(ev)


def test_mostly_corrupt_folder_yields_batches_with_bounded_logs(mostly_bad, caplog, monkeypatch):
    monkeypatch.setattr(pipeline, "_LOG_SKIPS_EVERY", 10)
    # 3 good of 15: at most 12 bad in a row per epoch, 24 across an epoch boundary.
    calls = []
    it = _iterator(
        "pretrain",
        _cfg(mostly_bad, max_consecutive_bad=24),
        batch=5,
        should_stop=lambda: calls.append(1) or False,
    )
    with caplog.at_level(logging.WARNING, logger="absl"):  # absl logging: the "absl" logger
        batches = [next(it) for _ in range(30)]
    for b in batches:
        assert b["image"].shape == (5, 16, 16, 3) and np.isfinite(b["image"]).all()
        assert set(b["key"].tolist()) <= {0, 5, 10}  # bad slots hold copies of good ones
    assert it.position > 30 and it.skipped > 60 and it.consecutive_bad <= 24
    assert len(calls) == it.position - 30  # polled once per dropped batch, never else
    warnings = [r for r in caplog.records if r.pathname == pipeline.__file__]
    assert pipeline._LOG_FIRST_SKIPS < len(warnings) <= 5 + it.position // 10
    assert "in 10 batches" in warnings[-1].getMessage()


@pytest.mark.parametrize("kind", ["pretrain", "train"])
def test_should_stop_interrupts_iterator_waiting_for_data(all_bad, kind):
    calls = []
    it = _iterator(kind, _cfg(all_bad), should_stop=lambda: len(calls) >= 2 or calls.append(1))
    with pytest.raises(pipeline.Interrupted, match="stopped while waiting") as info:
        next(it)
    assert not isinstance(info.value, ValueError)
    assert len(calls) == 2 and it.position == 3 and it.skipped == 12


@pytest.mark.parametrize("value", [0, -3, None, True, 2.5, "10"])
def test_bad_max_consecutive_bad_is_refused(all_bad, value):
    cfg = ml_collections.ConfigDict(
        {"source": "folder", "path": all_bad, "max_consecutive_bad": value}
    )
    pattern = f"max_consecutive_bad must be a positive int.*got {re.escape(repr(value))}"
    with pytest.raises(ValueError, match=pattern):
        _iterator("pretrain", cfg)
    if value is None or isinstance(value, int):  # assignable to the default config
        with pytest.raises(ValueError, match=pattern):
            _iterator("train", _cfg(all_bad, max_consecutive_bad=value))
    assert schema.defaults(schema.DATA).max_consecutive_bad == 1000


def _garbage_folder(root):
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, c))
        for i in range(8):
            with open(os.path.join(root, c, f"{i}.jpg"), "wb") as f:
                f.write(b"not an image" * (i + 1))
    return root


@pytest.mark.slow
def test_input_that_is_all_bad_stops_with_a_sentence_and_honours_sigterm(tmp_path):
    folder = _garbage_folder(str(tmp_path / "garbage"))
    data = ["--config.data.source=folder", f"--config.data.path={folder}"]
    t0 = time.monotonic()
    out = subprocess.run(
        main_command(str(tmp_path / "a"), *data, "--config.data.max_consecutive_bad=20"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and folder in errors[0] and "max_consecutive_bad" in errors[0]
    assert "Traceback" not in out.stderr and time.monotonic() - t0 < 300
    # waiting for data that never comes: a SIGTERM is honoured
    workdir = str(tmp_path / "b")
    proc = subprocess.Popen(
        main_command(workdir, *data, "--config.data.max_consecutive_bad=1000000000"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "skipped" in line:  # the iterator is dropping batches
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines)[-2000:] + rest[-2000:]
    assert "preemption notice: saved step 0" in rest
