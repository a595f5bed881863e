"""Tests for mae_jax.checkpointing (8 simulated CPU devices, see conftest.py)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed=0):
    rng = np.random.RandomState(seed)
    return {
        "params": {
            "blocks": [
                {
                    "w": jnp.asarray(rng.randn(4, 6), jnp.float32),
                    "b": jnp.asarray(rng.randn(6), jnp.float32),
                }
                for _ in range(2)
            ],
            "cls_token": jnp.asarray(rng.randn(1, 1, 6), jnp.float32),
        },
        "opt": {"count": jnp.asarray(7, jnp.int32), "mu": jnp.asarray(rng.randn(3), jnp.bfloat16)},
        "step": 12,
        "rng": jax.random.key_data(jax.random.key(seed)),
        "host": np.arange(5, dtype=np.int64),
    }


def _abstract(tree):
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


META = {"data_position": 123, "seed": 0, "model": "mae_vit_tiny", "config": {"lr": 1e-4}}


def test_round_trip_nested_pytree_with_meta(tmp_path):
    state = _state()
    with checkpointing.Checkpointer(tmp_path / "ckpt", save_interval_steps=10) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert ckpt.save(10, state, META)
        ckpt.wait()
        restored, meta = ckpt.restore(10, _abstract(state))
        assert meta == META
        assert ckpt.read_meta(10) == META
    _assert_tree_equal(restored, state)
    # A fresh Checkpointer on the same directory sees the step (resume path).
    with checkpointing.Checkpointer(tmp_path / "ckpt") as again:
        assert again.latest_step() == 10
        assert again.read_meta(10)["model"] == "mae_vit_tiny"
        restored2, _ = again.restore(10, _abstract(state))
    _assert_tree_equal(restored2, state)


def test_round_trip_nnx_state_with_optimizer(tmp_path):
    import optax
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    with checkpointing.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(1, state, {})
        restored, _ = ckpt.restore(1, _abstract(state))
    assert isinstance(restored, nnx.State)
    _assert_tree_equal(restored, state)
    model2, _ = nnx.merge(graphdef, restored)
    np.testing.assert_array_equal(
        np.asarray(model2.layers[0].kernel[...]), np.asarray(model.layers[0].kernel[...])
    )


def test_async_save_survives_donation_of_saved_arrays(tmp_path):
    state = {"w": jnp.arange(1000.0)}
    expected = np.arange(1000.0, dtype=np.float32)
    with checkpointing.Checkpointer(tmp_path, save_interval_steps=1, async_save=True) as ckpt:
        assert ckpt.save(1, state, {})
        state["w"].delete()  # What a donated train step does to the old buffers.
        ckpt.wait()
        restored, _ = ckpt.restore(
            1, {"w": jax.ShapeDtypeStruct((1000,), jnp.float32, sharding=_single())}
        )
    np.testing.assert_array_equal(np.asarray(restored["w"]), expected)


def _single():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_keep_last_k(tmp_path):
    with checkpointing.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=1) as ckpt:
        for step in (1, 2, 3, 4):
            assert ckpt.save(step, {"x": jnp.full((2,), step)}, {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4
    assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [3, 4]


def test_save_interval_logic(tmp_path):
    with checkpointing.Checkpointer(tmp_path, save_interval_steps=5, async_save=False) as ckpt:
        assert [s for s in range(0, 16) if ckpt.should_save(s)] == [0, 5, 10, 15]
        assert not ckpt.save(3, {"x": jnp.zeros(2)}, {})  # Off the interval: skipped.
        assert ckpt.all_steps() == []
        assert ckpt.save(5, {"x": jnp.zeros(2)}, {})
        assert not ckpt.should_save(5)  # Already saved.
        assert not ckpt.should_save(0)  # Older than the latest.
        assert ckpt.save(7, {"x": jnp.zeros(2)}, {}, force=True)  # Final save off-interval.
        assert not ckpt.save(7, {"x": jnp.zeros(2)}, {}, force=True)  # Exists: no-op.
        assert ckpt.all_steps() == [5, 7]


def test_sigterm_requests_save_at_next_step(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=100, async_save=False)
    try:
        assert not ckpt.should_save(3) and not ckpt.preemption_requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread.
        assert ckpt.preemption_requested
        assert ckpt.should_save(3)
        assert ckpt.save(3, {"x": jnp.ones(2)}, {})
        assert ckpt.latest_step() == 3
        assert not ckpt.should_save(3)
    finally:
        ckpt.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_preemption_save_disabled_installs_no_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with checkpointing.Checkpointer(tmp_path, enable_preemption_save=False):
        assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("target_spec", ["replicated", "4x2"])
def test_sharded_save_restore_into_other_sharding(tmp_path, target_spec):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    w = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    b = np.arange(16, dtype=np.float32)
    state = {
        "w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
        "b": jax.device_put(b, NamedSharding(mesh, P("model"))),
    }
    if target_spec == "replicated":
        target_mesh = mesh
        specs = {"w": P(), "b": P()}
    else:
        target_mesh = jax.make_mesh((4, 2), ("x", "y"))
        specs = {"w": P("y", "x"), "b": P("x")}
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(target_mesh, specs[k]))
        for k, v in state.items()
    }
    with checkpointing.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(1, state, {})
        restored, _ = ckpt.restore(1, abstract)
    for k, expected in (("w", w), ("b", b)):
        assert restored[k].sharding == abstract[k].sharding
        np.testing.assert_array_equal(np.asarray(restored[k]), expected)
        for shard in restored[k].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


def test_missing_step_is_value_error_listing_steps(tmp_path):
    with checkpointing.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(2, {"x": jnp.zeros(2)}, {})
        ckpt.save(4, {"x": jnp.zeros(2)}, {})
        ckpt.wait()
        with pytest.raises(ValueError, match=r"step 3.*available steps: \[2, 4\]"):
            ckpt.restore(3, {"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
        with pytest.raises(ValueError, match=r"available steps: \[2, 4\]"):
            ckpt.read_meta(5)


def test_bad_inputs(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        checkpointing.Checkpointer(a_file)
    with pytest.raises(ValueError, match="max_to_keep"):
        checkpointing.Checkpointer(tmp_path / "a", max_to_keep=0)
    with pytest.raises(ValueError, match="save_interval_steps"):
        checkpointing.Checkpointer(tmp_path / "b", save_interval_steps=0)
    nested = tmp_path / "does" / "not" / "exist"
    with checkpointing.Checkpointer(nested, save_interval_steps=1) as ckpt:
        assert nested.is_dir()
        with pytest.raises(ValueError, match="JSON"):
            ckpt.save(1, {"x": jnp.zeros(2)}, {"bad": object()})
        with pytest.raises(ValueError, match="step"):
            ckpt.save(-1, {"x": jnp.zeros(2)}, {})
        assert ckpt.all_steps() == []


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, jax.numpy as jnp
    from mae_jax import checkpointing
    ckpt = checkpointing.Checkpointer(sys.argv[1], save_interval_steps=1, max_to_keep=3)
    state = {"big": jnp.asarray(np.arange(50 * 2**20, dtype=np.float32)),  # 200 MiB
             "small": jnp.arange(10)}
    ckpt.save(1, state, {"step": 1}); ckpt.wait()
    state = {"big": state["big"] + 1, "small": state["small"] + 1}
    ckpt.save(2, state, {"step": 2})
    # The async write of step 2 is now in flight: it is not yet a complete step.
    print("SAVING", ckpt.latest_step(), ckpt.all_steps(), flush=True)
    ckpt.wait()
    print("DONE", flush=True)
""")


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    ckdir = tmp_path / "ckpt"
    env = dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(ckdir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "SAVING 1 [1]", f"unexpected subprocess output: {line!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    entries = os.listdir(ckdir)
    # The kill landed mid-write: step 2 exists only as an uncommitted temporary dir.
    assert "2" not in entries and any(e.startswith("2.") for e in entries), entries

    with checkpointing.Checkpointer(ckdir, save_interval_steps=1) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        abstract = {
            "big": jax.ShapeDtypeStruct((50 * 2**20,), jnp.float32, sharding=_single()),
            "small": jax.ShapeDtypeStruct((10,), jnp.int32, sharding=_single()),
        }
        restored, meta = ckpt.restore(1, abstract)
        assert meta == {"step": 1}
        big = np.asarray(restored["big"])
        assert big[0] == 0 and big[-1] == 50 * 2**20 - 1
        np.testing.assert_array_equal(np.asarray(restored["small"]), np.arange(10))
        # The partial directory was cleaned up and step 2 can be written again.
        assert not any(e.startswith("2.") for e in os.listdir(ckdir))
        assert ckpt.save(2, {"big": restored["big"], "small": restored["small"]}, {"step": 2})
        ckpt.wait()
        assert ckpt.latest_step() == 2
