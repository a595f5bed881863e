"""The real command line (`python -m mae_jax.main`): a bad command line ends in one sentence
`error: ...` (no traceback) and writes nothing; architecture overrides are accepted."""

import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from mae_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # each test spawns the real command


def run_main(workdir, *args, config="configs/smoke.py", timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # one CPU device: the smoke config's mesh as on a laptop
    return subprocess.run(
        [sys.executable, "-m", "mae_jax.main", f"--config={config}", "--workdir", str(workdir)]
        + list(args),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(proc) -> str:
    """The single `error: ...` line of a failed run, checking there is no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def refused(proc, workdir, code=2) -> str:
    assert proc.returncode == code, proc.stderr
    assert not os.path.exists(workdir), os.listdir(workdir)
    return error_line(proc)


@pytest.mark.parametrize(
    "arg,key,hint",
    [
        ("--config.batch_szie=8", "'batch_szie'", "did you mean 'batch_size'?"),
        ("--config.model.nmae=x", "'model.nmae'", "did you mean 'model.name'?"),
        ("--config.optim.lrr=0.1", "'optim.lrr'", "did you mean 'optim.lr'?"),
        ("--config.model.zzzzzz=1", "'model.zzzzzz'", "config.model has keys"),
    ],
)
def test_unknown_config_key_is_one_sentence_with_hint(tmp_path, arg, key, hint):
    workdir = tmp_path / "w"
    line = refused(run_main(workdir, arg), workdir)
    assert line.startswith(f"error: unknown config key {key}") and hint in line


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--config.batch_size=abc"], "config.batch_size must be an int, got 'abc'"),
        (["--config.batch_size", "abc"], "config.batch_size must be an int, got 'abc'"),
        (["--config.optim.lr=fast"], "config.optim.lr must be a float, got 'fast'"),
        (["--config.model.scan_layers=maybe"], "config.model.scan_layers must be a bool"),
        (["--config.model.embed_dim=6.5"], "config.model.embed_dim must be an int, got '6.5'"),
    ],
)
def test_wrong_value_type_names_key_value_and_type(tmp_path, args, expected):
    workdir = tmp_path / "w"
    assert expected in refused(run_main(workdir, *args), workdir)


def test_missing_config_file(tmp_path):
    workdir = tmp_path / "w"
    line = refused(run_main(workdir, config="configs/no_such_config.py"), workdir)
    assert line == "error: config file 'configs/no_such_config.py' does not exist"


def test_config_file_with_syntax_error(tmp_path):
    bad = tmp_path / "bad_config.py"
    bad.write_text("def get_config(:\n    return None\n")
    workdir = tmp_path / "w"
    line = refused(run_main(workdir, config=str(bad)), workdir)
    assert line.startswith(f"error: config file '{bad}' has a syntax error at line 1")


def test_config_file_that_raises(tmp_path):
    bad = tmp_path / "raising_config.py"
    bad.write_text("def get_config():\n    return {}['missing']\n")
    workdir = tmp_path / "w"
    line = refused(run_main(workdir, config=str(bad)), workdir)
    assert line == f"error: config file '{bad}' failed at line 2: KeyError: 'missing'"


def test_unknown_flag(tmp_path):
    workdir = tmp_path / "w"
    line = refused(run_main(workdir, "--workdri=x"), workdir)
    assert "workdri" in line and "workdir" in line


@pytest.mark.parametrize(
    "arg,expected",
    [
        ("--config.model.num_heads=5", "embed_dim 128 is not divisible by its number of heads"),
        ("--config.model.depth=0", "depth must be a positive integer, got 0"),
        ("--config.model.dtype=bf16", "dtype 'bf16' is not one of"),
    ],
)
def test_invalid_architecture_is_refused_before_writing(tmp_path, arg, expected):
    workdir = tmp_path / "w"
    line = refused(run_main(workdir, arg), workdir, code=1)
    assert line.startswith("error: config.model: ") and expected in line
    if "num_heads" in arg:
        assert "num_heads 5" in line


def test_architecture_overrides_train(tmp_path):
    workdir = tmp_path / "w"
    proc = run_main(
        workdir,
        "--config.model.embed_dim=64",
        "--config.model.num_heads=4",
        "--config.batch_size=8",
        "--config.total_steps=2",
        "--config.checkpoint_every_steps=2",
        "--config.log_every_steps=1",
        "--config.reconstruction_every_steps=0",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = json.loads((workdir / "config.json").read_text())["model"]
    assert model["embed_dim"] == 64 and model["num_heads"] == 4
    assert model["depth"] is None  # the preset's
    # the run built the preset at width 64: its parameter count is logged
    abstract = nnx.eval_shape(
        lambda: models.create("mae_vit_tiny_patch4_32", embed_dim=64, num_heads=4)
    )
    params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert f"{params:,} trainable parameters" in proc.stderr
    # the console: our INFO lines, none of the libraries' (Orbax, JAX, TensorFlow's C++ logging)
    assert "checkpoint 2 saved" in proc.stderr
    for noise in ("InitializeLog", "oneDNN", "checkpoint_manager.py", "xla_bridge.py"):
        assert noise not in proc.stderr, proc.stderr
