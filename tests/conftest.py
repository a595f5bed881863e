"""Test setup: force the CPU with 8 simulated devices before JAX starts; keep the XLA
compilation cache of this session in a temporary directory (never the user's home)."""

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
