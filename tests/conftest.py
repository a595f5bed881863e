"""Test setup: force the CPU with 8 simulated devices before JAX starts; keep the XLA
compilation cache of this session in a temporary directory (never the user's home), used by
this process and every process it starts. Tiers and budgets: tests/README.md."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Read by mae_jax.compile_cache (config.compilation_cache='auto'); subprocesses inherit it.
os.environ["MAE_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="mae_jax_test_xla_cache_")
atexit.register(shutil.rmtree, os.environ["MAE_JAX_COMPILATION_CACHE"], ignore_errors=True)

from mae_jax import compile_cache  # noqa: E402

# On for this process too, not only for the training runs that enable it: a program that many
# tests compile (the tiny model's step, its forward) is compiled once and loaded after that.
compile_cache.enable(compile_cache.AUTO)


import logging  # noqa: E402

import pytest  # noqa: E402


def _absl_messages(level):
    """Collects the absl messages at `level` and above, as texts, while the fixture lives."""
    from absl import logging as absl_logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = absl_logging.get_absl_logger()
    handler, before = Keep(level=level), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:  # let the messages through, never hold any back
        logger.setLevel(level)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(before)


@pytest.fixture
def warnings_log():
    """The absl warnings logged during the test, as message texts."""
    yield from _absl_messages(logging.WARNING)


@pytest.fixture
def info_log():
    """The absl INFO (and higher) messages logged during the test."""
    yield from _absl_messages(logging.INFO)


@pytest.fixture(autouse=True, scope="module")
def _release_programs():
    """After each test file: drop JAX's in-memory compiled programs and traces, so the session's
    memory does not grow file after file (a later file needing one loads it from the cache)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The workdir of one finished `config_files.tiny_pretrain()` run, trained once per session:
    read it, never write to it (copy it with `copy_tiny_run`)."""
    from config_files import tiny_pretrain

    from mae_jax.tasks import pretrain

    workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
    pretrain.train_and_evaluate(tiny_pretrain(), workdir)
    return workdir


@pytest.fixture
def copy_tiny_run(tiny_run, tmp_path):
    """A copy of `tiny_run` in this test's tmp_path, to resume, extend or damage."""
    return shutil.copytree(tiny_run, str(tmp_path / "run"), symlinks=True)
