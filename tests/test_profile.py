"""config.profile_steps: a jax.profiler trace of a window of training steps in the workdir."""

import glob
import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from config_files import ROOT, parse_main_flags
from config_files import tiny_pretrain as small

from mae_jax import profiler
from mae_jax.tasks import pretrain


def _trace_files(profile_dir):
    runs = glob.glob(os.path.join(profile_dir, "plugins", "profile", "*"))
    assert len(runs) == 1, runs
    return {
        "xplane": glob.glob(os.path.join(runs[0], "*.xplane.pb")),
        "perfetto": glob.glob(os.path.join(runs[0], "perfetto_trace.json.gz")),
    }


def _event_names(perfetto_path):
    with gzip.open(perfetto_path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e.get("name") for e in events]


@pytest.mark.parametrize(
    "value, message",
    [
        ((-1, 3), "the start step must be >= 0"),
        ((10, 0), "the number of steps must be >= 1"),
        ((10,), r"must be \(start_step, num_steps\)"),
        ((1, 2, 3), r"must be \(start_step, num_steps\)"),
        (("abc",), r"must be \(start_step, num_steps\)"),
        ((1.5, 2), r"must be \(start_step, num_steps\)"),
        ((True, 2), r"must be \(start_step, num_steps\)"),
        ("10,3", r"must be \(start_step, num_steps\)"),
    ],
)
def test_bad_windows_are_refused_naming_the_value(value, message):
    with pytest.raises(ValueError, match=message) as e:
        profiler.window(value)
    assert repr(value) in str(e.value)


def test_good_windows():
    assert profiler.window(None) is None
    assert profiler.window((10, 3)) == (10, 3)
    assert profiler.window([0, 1]) == (0, 1)


def test_a_bad_window_stops_the_run_before_anything_is_written(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"profile_steps=\(-1, 3\)"):
        pretrain.train_and_evaluate(small(profile_steps=(-1, 3)), workdir)
    assert not os.path.exists(workdir)


def test_the_command_line_refuses_a_bad_window(tmp_path):
    """`--config.profile_steps=(10, 0)` through main.py's parser (fresh flags, as main.py
    defines them) reaches the window check of the entry point main.py calls, before anything is
    written. In this process: main.py's `error: ...` line and exit status 1 for a ValueError of
    the entry point are checked in a real process by test_cli_errors."""
    workdir = tmp_path / "run"
    argv = ["main", f"--config={ROOT}/configs/smoke.py", f"--workdir={workdir}"]
    argv.append("--config.profile_steps=(10, 0)")
    config, workdir_flag = parse_main_flags(argv)
    with pytest.raises(ValueError) as e:
        pretrain.train_and_evaluate(config, workdir_flag)
    line = f"error: {e.value}"
    assert line == "error: config.profile_steps=(10, 0): the number of steps must be >= 1", line
    assert not workdir.exists()


@pytest.mark.slow
def test_a_training_run_writes_the_trace_of_its_window(tmp_path):
    """In its own process, as users run it (a trace taken inside this long pytest process, after
    hundreds of tests have loaded TensorFlow and JAX state, once ended in a segfault). The
    model, batch and mesh of `tiny_run`: its programs, from the compilation cache. A window of
    one step (each step traced costs about a CPU second more; windows of several steps are
    covered in this process by the test below), the step that saves checkpoint 3, and a step
    after it: training goes on once the trace is written."""
    workdir = str(tmp_path / "run")
    settings = {
        "model.name": "mae_vit_test",
        "batch_size": 16,
        "total_steps": 4,
        "warmup_steps": 0,
        "log_every_steps": 2,
        "checkpoint_every_steps": 3,
        "reconstruction_every_steps": 0,
        "profile_steps": "(2, 1)",
    }
    out = subprocess.run(
        [sys.executable, "-m", "mae_jax.main", "--config=configs/smoke.py", f"--workdir={workdir}"]
        + [f"--config.{k}={v}" for k, v in settings.items()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    profile_dir = os.path.join(workdir, "profile")
    files = _trace_files(profile_dir)
    assert len(files["xplane"]) == 1 and len(files["perfetto"]) == 1, files
    names = _event_names(files["perfetto"][0])
    assert names.count("train") == 1  # the StepTraceAnnotation of step 2, no other
    assert "data" in names and "checkpoint_save" in names  # step 2 saves checkpoint 3
    assert f"profile of steps 2..2 written to {profile_dir}" in out.stderr
    assert "step 4/4" in out.stdout  # the step after the window
    assert "start-up compilation" in out.stderr


def _step(x):
    return jax.jit(lambda v: jnp.sin(v) * 2.0)(x)


def test_a_run_that_ends_inside_the_window_still_writes_it(tmp_path, info_log):
    root = str(tmp_path / "run")
    trace = profiler.Profiler((2, 10), root, first=0, total=4)
    x = jnp.ones((4,))
    for step in range(4):
        trace.before(step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            x = _step(x)
        trace.after(step, x)
    trace.stop(x)  # what the loop's `finally` does
    profile_dir = os.path.join(root, "profile")
    files = _trace_files(profile_dir)
    assert files["xplane"] and files["perfetto"]
    assert _event_names(files["perfetto"][0]).count("train") == 2
    assert f"profile of steps 2..3 written to {profile_dir}" in "\n".join(info_log)
    trace.stop(x)  # idempotent


def test_a_remote_workdir_gets_a_copy(info_log):
    import tensorflow as tf

    root = f"ram://profile-test-{os.getpid()}"
    trace = profiler.Profiler((0, 1), root, first=0, total=2)
    x = _step(jnp.ones((4,)))
    trace.before(0)
    x = _step(x)
    trace.after(0, x)
    names = [os.path.basename(p) for p in tf.io.gfile.glob(f"{root}/profile/plugins/profile/*/*")]
    assert "perfetto_trace.json.gz" in names and any(n.endswith(".xplane.pb") for n in names)
    assert f"profile of steps 0..0 written to {root}/profile" in "\n".join(info_log)


def test_a_window_after_the_run_warns(warnings_log):
    profiler.Profiler((10, 3), "/nonexistent", first=0, total=5)
    profiler.Profiler((0, 3), "/nonexistent", first=3, total=5)
    assert sum("no step of that window is run" in m for m in warnings_log) == 2
    profiler.Profiler((4, 3), "/nonexistent", first=3, total=5)
    assert sum("no step of that window is run" in m for m in warnings_log) == 2
