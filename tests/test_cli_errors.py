"""The command line of `python -m mae_jax.main`: a bad command line ends in one sentence
`error: ...` (no traceback) and writes nothing; architecture overrides are accepted.

Real processes where the process is the point: a bad command line (an unknown flag, caught by
absl on main's own flags; an unknown config key, caught by main's parser before absl) exits 2,
an invalid architecture exits 1, overrides train and save (exit 0, a quiet console). The other
messages are checked in this process, through the parser main.py uses
(`cli.config_flags_parser`, on fresh flags defined as main.py defines them) and through the
pretraining entry point main.py calls: the same code, ~5-15 s less per case."""

import json
import os
import subprocess
import sys

import jax
import pytest
from config_files import load_config, override, parse_main_flags
from flax import nnx

from mae_jax import models
from mae_jax.tasks import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def parse_main(capsys, workdir, *args, config="configs/smoke.py"):
    """`config_files.parse_main_flags` of main.py's command line, as of a process: its exit
    status (SystemExit) and what it printed on stderr."""
    capsys.readouterr()
    argv = ["main", f"--config={config}", "--workdir", str(workdir), *args]
    old = os.getcwd()
    os.chdir(ROOT)  # the config path is relative to the repository, as in run_main
    try:
        parse_main_flags(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(argv, code, "", capsys.readouterr().err)


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


@pytest.mark.slow  # a real process
def test_unknown_config_key_in_a_real_process(tmp_path):
    workdir = tmp_path / "w"
    line = refused(run_main(workdir, "--config.batch_szie=8"), workdir)
    assert line.startswith("error: unknown config key 'batch_szie'")
    assert "did you mean 'batch_size'?" in line


@pytest.mark.parametrize(
    "arg,key,hint",
    [
        ("--config.batch_szie=8", "'batch_szie'", "did you mean 'batch_size'?"),
        ("--config.model.nmae=x", "'model.nmae'", "did you mean 'model.name'?"),
        ("--config.optim.lrr=0.1", "'optim.lrr'", "did you mean 'optim.lr'?"),
        ("--config.model.zzzzzz=1", "'model.zzzzzz'", "config.model has keys"),
    ],
)
def test_unknown_config_key_is_one_sentence_with_hint(tmp_path, capsys, arg, key, hint):
    workdir = tmp_path / "w"
    line = refused(parse_main(capsys, workdir, arg), workdir)
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
def test_wrong_value_type_names_key_value_and_type(tmp_path, capsys, args, expected):
    workdir = tmp_path / "w"
    assert expected in refused(parse_main(capsys, workdir, *args), workdir)


def test_missing_config_file(tmp_path, capsys):
    workdir = tmp_path / "w"
    line = refused(parse_main(capsys, workdir, config="configs/no_such_config.py"), workdir)
    assert line == "error: config file 'configs/no_such_config.py' does not exist"


def test_config_file_with_syntax_error(tmp_path, capsys):
    bad = tmp_path / "bad_config.py"
    bad.write_text("def get_config(:\n    return None\n")
    workdir = tmp_path / "w"
    line = refused(parse_main(capsys, workdir, config=str(bad)), workdir)
    assert line.startswith(f"error: config file '{bad}' has a syntax error at line 1")


def test_config_file_that_raises(tmp_path, capsys):
    bad = tmp_path / "raising_config.py"
    bad.write_text("def get_config():\n    return {}['missing']\n")
    workdir = tmp_path / "w"
    line = refused(parse_main(capsys, workdir, config=str(bad)), workdir)
    assert line == f"error: config file '{bad}' failed at line 2: KeyError: 'missing'"


@pytest.mark.slow  # a real process: absl's error on main.py's own flags
def test_unknown_flag(tmp_path):
    workdir = tmp_path / "w"
    line = refused(run_main(workdir, "--workdri=x"), workdir)
    assert "workdri" in line and "workdir" in line


@pytest.mark.slow  # a real process: exit status 1, nothing written
def test_invalid_architecture_is_refused_by_the_process_before_writing(tmp_path):
    workdir = tmp_path / "w"
    line = refused(run_main(workdir, "--config.model.num_heads=5"), workdir, code=1)
    assert line.startswith("error: config.model: ")
    assert "embed_dim 128 is not divisible by its number of heads" in line
    assert "num_heads 5" in line


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("num_heads", 5, "embed_dim 128 is not divisible by its number of heads"),
        ("depth", 0, "depth must be a positive integer, got 0"),
        ("dtype", "bf16", "dtype 'bf16' is not one of"),
    ],
)
def test_invalid_architecture_is_refused_before_writing(tmp_path, key, value, expected):
    """What main.py runs for the config of `--config.model.KEY=VALUE` (its `error:` line is
    the message of this error: the process test above)."""
    workdir = tmp_path / "w"
    with pytest.raises(ValueError) as e:
        pretrain.train_and_evaluate(override(load_config(), **{f"model.{key}": value}), workdir)
    line = f"error: {e.value}"
    assert "\n" not in line
    assert line.startswith("error: config.model: ") and expected in line
    if key == "num_heads":
        assert "num_heads 5" in line
    assert not os.path.exists(workdir), os.listdir(workdir)


@pytest.mark.slow  # a real training process
def test_architecture_overrides_train(tmp_path):
    """On the 2-block test model (half the blocks of the smoke config's preset, a quarter of
    its tokens: a cheaper compile), two of its fields overridden."""
    workdir = tmp_path / "w"
    proc = run_main(
        workdir,
        "--config.model.name=mae_vit_test",
        "--config.model.embed_dim=64",
        "--config.model.num_heads=2",
        "--config.batch_size=8",
        "--config.total_steps=2",
        "--config.checkpoint_every_steps=2",
        "--config.log_every_steps=1",
        "--config.reconstruction_every_steps=0",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = json.loads((workdir / "config.json").read_text())["model"]
    assert model["embed_dim"] == 64 and model["num_heads"] == 2
    assert model["depth"] is None  # the preset's
    # the run built the preset at width 64: its parameter count is logged
    abstract = nnx.eval_shape(lambda: models.create("mae_vit_test", embed_dim=64, num_heads=2))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert f"{params:,} trainable parameters" in proc.stderr
    # the console: our INFO lines, none of the libraries' (Orbax, JAX, TensorFlow's C++ logging)
    assert "checkpoint 2 saved" in proc.stderr
    for noise in ("InitializeLog", "oneDNN", "checkpoint_manager.py", "xla_bridge.py"):
        assert noise not in proc.stderr, proc.stderr
