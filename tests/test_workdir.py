"""The workdir API: checkpoints saved and restored into shardings, keep-last-K with milestones,
the writer's lock, read-only readers, damaged checkpoints, and the path layer on a non-local file
system (TensorFlow's `ram://`)."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax import metrics
from mae_jax import workdir as wdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def _state(step):
    sh = NamedSharding(_mesh(), P("x"))
    w = jax.device_put(jnp.arange(16.0) + step, sh)
    return {"params": {"w": w, "b": np.float32(step)}, "opt_state": {"mu": w * 2}, "step": step}


def _target(sharding=None):
    def leaf(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return {
        "params": {"w": leaf((16,), jnp.float32), "b": leaf((), jnp.float32)},
        "opt_state": {"mu": leaf((16,), jnp.float32)},
        "step": leaf((), jnp.int64 if jax.config.jax_enable_x64 else jnp.int32),
    }


def _save(root, steps, **kw):
    with wdir.Writer(root, handle_sigterm=False, **kw) as w:
        for s in steps:
            w.save(s, _state(s), {"step": s, "model": {"name": "m"}})
            w.wait()
        return sorted(w.steps())


def test_save_and_restore_into_other_shardings_and_params_only(tmp_path):
    root = str(tmp_path / "run")
    assert _save(root, [1, 2]) == [1, 2]
    reader = wdir.Reader(root)
    assert reader.steps() == [1, 2] and reader.meta(2)["step"] == 2
    replicated = NamedSharding(_mesh(), P())
    r = reader.restore(_target(replicated))
    assert r.step == 2 and r.meta["step"] == 2
    np.testing.assert_array_equal(r.state["params"]["w"], np.arange(16.0) + 2)
    assert r.state["params"]["w"].sharding == replicated
    older = reader.restore(_target(), step=1)  # no sharding: numpy
    assert isinstance(older.state["opt_state"]["mu"], np.ndarray) and older.step == 1
    only = reader.restore_params({"w": jax.ShapeDtypeStruct((16,), jnp.float32)})
    assert set(only.state) == {"w"} and only.step == 2
    with pytest.raises(wdir.WorkdirError, match=r"no finalized checkpoint 5 .*\[1, 2\]"):
        reader.restore(_target(), step=5)


def test_keep_last_k_and_milestones_kept_for_good(tmp_path):
    assert _save(str(tmp_path), range(1, 10), keep=2, keep_every=4) == [4, 8, 9]


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    root = str(tmp_path / "run")
    with wdir.Writer(root, handle_sigterm=False):
        with pytest.raises(
            wdir.WorkdirError, match=rf"in use by another run \(host .*pid {os.getpid()}, started "
        ):
            wdir.Writer(root, handle_sigterm=False)
    with wdir.Writer(root, handle_sigterm=False):  # released: free again
        pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path, warnings_log):
    root = str(tmp_path / "run")
    code = (
        "import os, signal; from mae_jax import workdir as w; "
        f"w.Writer({root!r}, handle_sigterm=False); os.kill(os.getpid(), signal.SIGKILL)"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == -9
    held = json.loads(open(os.path.join(root, wdir.LOCK)).read())
    assert held["pid"] != os.getpid()
    with wdir.Writer(root, handle_sigterm=False):
        pass
    assert any("taking over the lock" in m and str(held["pid"]) in m for m in warnings_log)


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(wdir.WorkdirError, match="is a file"):
        wdir.Writer(str(path), handle_sigterm=False)
    with pytest.raises(wdir.WorkdirError, match="is a file"):
        wdir.Reader(str(path))
    assert path.read_text() == "x"


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[p] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def test_readers_never_touch_the_workdir(tmp_path):
    root = str(tmp_path / "run")
    _save(root, [1, 2])
    # what a writer's in-flight save looks like: a temporary directory
    tmp = os.path.join(root, "checkpoints", "3.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(tmp, "state"))
    open(os.path.join(tmp, "state", "partial"), "w").write("x")
    before = _snapshot(root)
    reader = wdir.Reader(root)
    assert reader.steps() == [1, 2]
    reader.restore(_target())
    reader.restore_params({"w": jax.ShapeDtypeStruct((16,), jnp.float32)})
    assert _snapshot(root) == before


def _data_files(step_dir):
    out = []
    for d, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(d) == "d":
            out += [os.path.join(d, f) for f in files]
    assert out, f"no array data files under {step_dir}"
    return out


def _damage(step_dir, kind):
    if kind == "meta":
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    elif kind == "state_metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    elif kind == "delete_arrays":
        for f in _data_files(step_dir):
            os.remove(f)
    elif kind == "truncate_arrays":
        for f in _data_files(step_dir):
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)


def test_lost_state_metadata_still_restores_exactly(tmp_path):
    """Orbax's `state/_METADATA` is redundant when the target structure is given."""
    root = str(tmp_path / "run")
    _save(root, [2, 4])
    _damage(os.path.join(root, "checkpoints", "4"), "state_metadata")
    r = wdir.Reader(root).restore(_target())
    assert r.step == 4
    np.testing.assert_array_equal(r.state["opt_state"]["mu"], (np.arange(16.0) + 4) * 2)
    only = wdir.Reader(root).restore_params({"w": jax.ShapeDtypeStruct((16,), jnp.float32)})
    np.testing.assert_array_equal(only.state["w"], np.arange(16.0) + 4)


@pytest.mark.parametrize("kind", ["meta", "delete_arrays", "truncate_arrays"])
def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(tmp_path, kind, warnings_log):
    root = str(tmp_path / "run")
    _save(root, [2, 4])
    _damage(os.path.join(root, "checkpoints", "4"), kind)
    r = wdir.Reader(root).restore(_target())  # a reader only skips it
    assert r.step == 2
    assert os.path.isdir(os.path.join(root, "checkpoints", "4"))
    assert any("checkpoint 4" in m and "trying step 2" in m for m in warnings_log)
    with wdir.Writer(root, handle_sigterm=False) as w:  # a writer moves it aside
        assert w.restore(_target()).step == 2
        moved = os.listdir(os.path.join(root, wdir.DAMAGED))
        assert len(moved) == 1 and moved[0].startswith("4-")
        assert w.steps() == [2]
        w.save(3, _state(3), {"step": 3})  # later saves are not confused with the old step 4
        w.wait()
        assert w.steps() == [2, 3]


def test_a_checkpoint_deleted_by_its_run_while_read_is_not_damage(
    tmp_path, monkeypatch, warnings_log
):
    """Keep-last-K removes the checkpoint a reader (an export of a live run) is reading: the
    reader takes the newest remaining one, calls nothing damaged, and drops the "Event loop is
    closed" reports of Orbax's abandoned reads (152 tracebacks on an export's stderr once)."""
    root = str(tmp_path / "run")
    _save(root, [2, 4])
    read = wdir.Reader._read_state

    def read_while_deleted(self, step, target, partial):
        if step == 4:
            shutil.rmtree(os.path.join(root, "checkpoints", "4"))
            raise FileNotFoundError("checkpoints/4/state: gone")
        return read(self, step, target, partial)

    monkeypatch.setattr(wdir.Reader, "_read_state", read_while_deleted)
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
    damaged = []
    r = wdir.Reader(root).restore(_target(), on_damaged=lambda *a: damaged.append(a))
    assert r.step == 2 and damaged == [] and not any("damaged" in w for w in warnings_log)
    assert getattr(sys.unraisablehook, "_mae_jax_quiet", False)


def test_no_intact_checkpoint_is_one_sentence(tmp_path):
    root = str(tmp_path / "run")
    _save(root, [2, 4])
    _damage(os.path.join(root, "checkpoints", "2"), "delete_arrays")
    _damage(os.path.join(root, "checkpoints", "4"), "meta")
    with pytest.raises(wdir.WorkdirError, match=r"^no intact checkpoint in .*step 4: .*step 2: "):
        wdir.Reader(root).restore(_target())


# ----------------------------------------------------------------------------- ram://
def _ram(name):
    pytest.importorskip("tensorflow")
    return f"ram://{name}-{os.getpid()}-{time.monotonic_ns()}"


def test_run_files_go_through_the_path_layer_on_a_non_local_file_system():
    root = _ram("run")
    assert wdir.is_remote(root)
    wdir.check_writable_dir(root)
    w = wdir.Writer.__new__(wdir.Writer)  # only the JSON-file half of a writer
    w.root, w.primary = root, True
    w.write_config({"a": 1}, 0)
    w.write_config({"a": 1}, 5)  # unchanged: no history
    assert not wdir.exists(wdir.join(root, wdir.CONFIG_HISTORY))
    w.write_config({"a": 2}, 7)
    assert wdir.read_json(wdir.join(root, wdir.CONFIG)) == {"a": 2}
    history = wdir.read_json(wdir.join(root, wdir.CONFIG_HISTORY))
    assert history[0]["replaced_at_step"] == 7 and history[0]["config"] == {"a": 1}
    assert wdir.write_results(root, {"top1": 12.5}) == wdir.join(root, wdir.RESULTS)
    assert wdir.read_results(root) == {"top1": 12.5}
    assert not os.path.exists("ram:")  # nothing went to a local folder named after the URI

    writer = metrics.MetricsWriter(root, console=False)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": 1.0 / step})
    writer.close()
    assert [r["step"] for r in metrics.read_jsonl(root)] == [1, 2, 3]
    assert metrics.truncate_after(root, 2) == 1
    assert [r["step"] for r in metrics.read_jsonl(root)] == [1, 2]
    assert any(name.startswith("events.out.tfevents") for name in wdir.listdir(root))


def test_lock_lease_on_a_non_local_file_system(warnings_log):
    root = _ram("lease")
    wdir.makedirs(root)
    first = wdir.Lock(root).acquire()
    with pytest.raises(wdir.WorkdirError, match=rf"in use by another run .*pid {os.getpid()}"):
        wdir.Lock(root).acquire()
    first.release()
    assert not wdir.exists(wdir.join(root, wdir.LOCK))
    # a lease of a dead process of this host, and a stale one of another host: taken over
    import socket

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = [
        {
            "host": socket.gethostname(),
            "pid": int(dead.stdout),
            "started": "s",
            "heartbeat": time.time(),
        },
        {"host": "elsewhere", "pid": 1, "started": "s", "heartbeat": time.time() - 3600},
    ]
    for holder in stale:
        wdir.write_json(wdir.join(root, wdir.LOCK), holder)
        lock = wdir.Lock(root).acquire()
        assert wdir.read_json(wdir.join(root, wdir.LOCK))["pid"] == os.getpid()
        lock.release()
    assert sum("taking over the lock" in m for m in warnings_log) == 2
    # a fresh lease of another host is respected
    wdir.write_json(
        wdir.join(root, wdir.LOCK),
        {"host": "elsewhere", "pid": 1, "started": "s", "heartbeat": time.time()},
    )
    with pytest.raises(wdir.WorkdirError, match="host elsewhere, pid 1"):
        wdir.Lock(root).acquire()
