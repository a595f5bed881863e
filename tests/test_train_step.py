"""The sharded pretraining step: the same loss and update on every mesh, gradient accumulation
equal to the full batch, FSDP-sharded parameters and optimizer state."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from mae_jax import models, optim, schema
from mae_jax import sharding as shd
from mae_jax.tasks import pretrain


def _optim_config():
    # SGD keeps the update proportional to the gradient. (Adam would turn float noise of the
    # exactly-zero gradients, e.g. of the key biases, into +-lr updates on any mesh change.)
    oc = schema.defaults(schema.OPTIM)
    oc.name, oc.weight_decay = "sgd", 0.05
    return oc


LR = optim.warmup_cosine_schedule(0.5, 10, 1)


@functools.cache  # the (2, 2, 2) run serves both tests below
def _run_steps(mesh_shape, accum=1, steps=1, batch=16):
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, mesh_shape)))
    fns = pretrain.build_step("mae_vit_test", _optim_config(), LR, mesh, accum_steps=accum)
    state = fns.init()
    images = np.random.default_rng(0).standard_normal((batch, 32, 32, 3), np.float32)
    losses = []
    for _ in range(steps):
        state, m = fns.step(state, {"image": shd.global_batch(images, mesh)}, jax.random.key(1))
        losses.append(float(m["loss"]))
    params = {
        "/".join(map(str, k)): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state["params"]))[0]
    }
    return losses, params, float(m["grad_norm"])


@pytest.mark.slow  # two meshes compiled
def test_one_step_is_the_same_on_every_mesh():
    """Data parallel on 8 devices against data x FSDP x tensor on 2 x 2 x 2 (the batch split 8
    and 4 ways, the weights 1 and 4 ways): the same losses, gradient norm and parameters. (A
    third layout, FSDP on 4, added a compile and no other axis.)"""
    ref_loss, ref_params, ref_gn = _run_steps((8, 1, 1), steps=2)
    loss, params, gn = _run_steps((2, 2, 2), steps=2)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(gn, ref_gn, rtol=1e-4)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.slow  # two meshes compiled (one shared)
def test_gradient_accumulation_equals_full_batch():
    full_loss, full_params, _ = _run_steps((2, 2, 2), steps=2)
    acc_loss, acc_params, _ = _run_steps((2, 2, 2), accum=2, steps=2)  # 2 x 8 images
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-5)
    for k in full_params:
        np.testing.assert_allclose(acc_params[k], full_params[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_params_and_optimizer_state_are_fsdp_sharded():
    """A real init on the 2 x 2 x 2 mesh of the tests above (in a whole run the compilation
    cache serves their init program): the MLP kernels and their momentum split over fsdp and
    tensor, a quarter on each device."""
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, (2, 2, 2))))
    fns = pretrain.build_step("mae_vit_test", _optim_config(), LR, mesh)
    state = fns.init()
    kernel = state["params"]["blocks"][0]["mlp"]["fc1"]["kernel"].get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    mu = state["opt_state"][1].trace["blocks"][0]["mlp"]["fc1"]["kernel"].get_value()
    assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (16, 64)


def test_stacked_blocks_are_fsdp_sharded_with_a_replicated_layers_axis():
    """The init program's output shardings, abstractly (`jax.eval_shape`: the test above runs
    an init for real; compiling this one took ~5 s)."""
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    fns = pretrain.build_step(
        models.resolve("mae_vit_test", scan_layers=True), _optim_config(), LR, mesh
    )
    state, _ = jax.eval_shape(fns.jit_init)
    kernel = state["params"]["blocks"]["mlp"]["fc1"]["kernel"].get_value()
    assert kernel.shape == (2, 32, 128)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    mu = state["opt_state"][1].trace["blocks"]["mlp"]["fc1"]["kernel"].get_value()
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert len(kernel.sharding.addressable_devices) == 8
    assert kernel.sharding.shard_shape(kernel.shape) == (2, 8, 128)


def test_the_run_length_is_not_in_the_program():
    """The schedule's numbers are an argument of the step: runs of other lengths, warm-ups and
    peaks lower to one program (one compile, one cache entry); so do extensions, given their
    count (a (start, lr, length) triple each)."""
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, (8, 1, 1))))

    def program(schedule):
        fns = pretrain.build_step("mae_vit_test", _optim_config(), schedule, mesh)
        return fns.jit_step.lower(*fns.abstract_args({"image": ((16, 32, 32, 3), np.float32)}))

    plain = [LR, optim.warmup_cosine_schedule(1e-3, 400, 40, 1e-6)]
    extended = [
        optim.extended_schedule(0.5, 30, 1, 0.0, [(5, 10)]),
        optim.extended_schedule(2.0, 90, 4, 1e-5, [(50, 60)]),
    ]
    texts = [program(s).as_text() for s in plain + extended]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
