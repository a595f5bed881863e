"""Test setup: force the CPU with 8 simulated devices before JAX starts; keep the XLA
compilation cache of this session in a temporary directory (never the user's home), used by
this process, its pytest-xdist workers and every process they start; run the files on as many
workers as the machine has cores (at most 4). Tiers and budgets: tests/README.md."""

import atexit
import collections
import ctypes
import fcntl
import gc
import os
import shutil
import tempfile

_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Read by glibc when a process starts, so by the xdist workers and every process they start:
# fewer malloc arenas for TensorFlow's and XLA's many threads. Measured on a 6-step smoke run:
# peak resident size 1.42 GB -> 1.08 GB, no slower.
os.environ.setdefault("MALLOC_ARENA_MAX", "2")
# Read by mae_jax.compile_cache (config.compilation_cache='auto'). Made by the pytest process
# that starts the session and removed by it at exit; xdist workers and subprocesses inherit it.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["MAE_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="mae_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["MAE_JAX_COMPILATION_CACHE"], ignore_errors=True)

from mae_jax import compile_cache  # noqa: E402

# On for this process too, not only for the training runs that enable it: a program that many
# tests compile (the tiny model's step, its forward) is compiled once and loaded after that.
compile_cache.enable(compile_cache.AUTO)

import jax  # noqa: E402

# Start the backends now: the 8 devices are fixed from here on, so a test that asks JAX for
# another CPU device count before it starts (the AOT stand-in, `aot.select_backend`) cannot
# change them for the tests after it in the same process.
jax.devices()


import logging  # noqa: E402

import pytest  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (setup.cfg): one worker per core, at most 4 (each holds up to ~2 GB); none when
    the command names single tests (`file.py::test`) or one file, where starting workers costs
    more than it gains."""
    args = config.args
    if args and (all("::" in a for a in args) or len(args) == 1 and os.path.isfile(args[0])):
        return 0
    return min(len(os.sched_getaffinity(0)), 4)


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselected what does not run
def pytest_collection_modifyitems(items):
    """The files with selected slow tests first, then the others by number of tests, each
    file's tests in their order. xdist hands out whole files in this order
    (`--no-loadscope-reorder` in setup.cfg) and queues the next one on a worker with 2 tests
    left: with the default order (most tests first), the two long one-test files came last and
    queued on one worker while the other sat idle for 97 s of a 705 s run."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    count = collections.Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path not in slow, -count[item.path], str(item.path)))


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


# glibc's malloc keeps what a process frees (XLA's buffers, torch's tensors) for reuse instead
# of returning it: measured 0.5-1.1 GB per test file. malloc_trim hands it back to the system.
_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
_TRIM_GROWTH_MB = 500
_trimmed_at_mb = [0]  # this process's own memory after the last trim


def _anon_mb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next((int(s.split()[1]) // 1024 for s in f if s.startswith("RssAnon:")), 0)


def _trim():
    if _TRIM:
        _TRIM(0)
        _trimmed_at_mb[0] = _anon_mb()


@pytest.fixture(autouse=True)
def _trim_memory():
    """After a test that grew this process's own memory by 500 MB since the last trim: give the
    freed heap back (the workers and the processes they start share 4 GiB). Not after every
    test: a trim walks the whole heap, and after every test with a garbage collection it made
    small files twice as slow (test_optim 17 s -> 32 s)."""
    yield
    if _TRIM and _anon_mb() > _trimmed_at_mb[0] + _TRIM_GROWTH_MB:
        _trim()


@pytest.fixture(autouse=True, scope="module")
def _release_programs():
    """After each test file: drop JAX's in-memory compiled programs and traces and give the
    freed memory back, so the session's memory does not grow file after file (a later file
    needing a program loads it from the cache)."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
    _trim()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The workdir of one finished `config_files.tiny_pretrain()` run, trained once per session:
    read it, never write to it (copy it with `copy_tiny_run`)."""
    from config_files import tiny_pretrain

    from mae_jax.tasks import pretrain

    # One folder for the whole session: xdist workers share the parent of their base temps.
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    workdir, done = root / "tiny_run", root / "tiny_run.done"
    with open(root / "tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker trains, the others wait and read
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a worker that died while training
            pretrain.train_and_evaluate(tiny_pretrain(), str(workdir))
            done.touch()
    return str(workdir)


@pytest.fixture
def copy_tiny_run(tiny_run, tmp_path):
    """A copy of `tiny_run` in this test's tmp_path, to resume, extend or damage."""
    return shutil.copytree(tiny_run, str(tmp_path / "run"), symlinks=True)


@pytest.fixture
def spawn(tmp_path):
    """Starts real processes (tests/procs.py) that log into tmp_path; kills what is left after
    the test."""
    from procs import Spawner

    spawner = Spawner(tmp_path)
    yield spawner
    spawner.kill_all()
