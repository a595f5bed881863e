"""Tests for mae_jax.optim: schedules, decay mask, layer-wise lr decay, LARS, AdamW, clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax import optim, schema


def official_lr(t, lr, total, warmup, min_lr=0.0):
    """The official MAE util/lr_sched.py formula, per iteration."""
    if t < warmup:
        return lr * t / warmup
    return min_lr + (lr - min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (t - warmup) / (total - warmup))
    )


def vit_tree(depth=12, dim=4, head=3, rng=None, pos_embed=True):
    """A param dict shaped like the fine-tuning ViT (blocks as a list -> SequenceKey paths)."""
    rng = rng or np.random.default_rng(0)

    def r(*s):
        return jnp.asarray(rng.normal(size=s), jnp.float32)

    def block():
        return {
            "norm1": {"scale": r(dim), "bias": r(dim)},
            "attn": {
                "qkv": {"kernel": r(dim, 3 * dim), "bias": r(3 * dim)},
                "proj": {"kernel": r(dim, dim), "bias": r(dim)},
            },
            "norm2": {"scale": r(dim), "bias": r(dim)},
            "mlp": {
                "fc1": {"kernel": r(dim, 2 * dim), "bias": r(2 * dim)},
                "fc2": {"kernel": r(2 * dim, dim), "bias": r(dim)},
            },
        }

    tree = {
        "cls_token": r(1, 1, dim),
        "patch_embed": {"proj": {"kernel": r(12, dim), "bias": r(dim)}},
        "blocks": [block() for _ in range(depth)],
        "fc_norm": {"scale": r(dim), "bias": r(dim)},
        "head": {"kernel": r(dim, head), "bias": r(head)},
    }
    if pos_embed:
        tree["pos_embed"] = r(1, 5, dim)
    return tree


class _Block(nnx.Module):
    def __init__(self, dim, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = nnx.Linear(dim, dim, rngs=rngs)


class _TinyVit(nnx.Module):
    def __init__(self, depth, dim, rngs):
        self.cls_token = nnx.Param(jnp.full((1, 1, dim), 0.5))
        self.patch_embed = nnx.Linear(6, dim, rngs=rngs)
        self.blocks = nnx.List([_Block(dim, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, 2, rngs=rngs)


def by_name(tree):
    return {
        ".".join(optim.path_names(p)): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


# ----------------------------------------------------------------------------- schedule


def test_warmup_cosine_matches_official_formula():
    lr, total, warmup, min_lr = 2.4e-3, 1000, 100, 1e-5
    sched = optim.warmup_cosine_schedule(lr, total, warmup, min_lr)
    for t in (0, 1, 50, 99, 100, 101, 550, 999, 1000):
        np.testing.assert_allclose(
            float(sched(t)),
            official_lr(t, lr, total, warmup, min_lr),
            rtol=1e-5,
            atol=1e-10,
            err_msg=f"t={t}",
        )
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(50)), lr / 2, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(sched(550)), (lr + min_lr) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(sched(1000)), min_lr, rtol=1e-5)
    np.testing.assert_allclose(float(sched(5000)), min_lr, rtol=1e-5)  # held past the end
    # traced step under jit gives the same values
    ts = jnp.arange(0, 1001, 37)
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.vmap(sched))(ts)),
        [official_lr(int(t), lr, total, warmup, min_lr) for t in ts],
        rtol=1e-5,
        atol=1e-10,
    )


def test_schedule_without_warmup_and_all_warmup():
    s0 = optim.warmup_cosine_schedule(1.0, 10, 0)
    np.testing.assert_allclose(
        [float(s0(t)) for t in range(11)],
        [official_lr(t, 1.0, 10, 0) for t in range(11)],
        atol=1e-6,
    )
    s1 = optim.warmup_cosine_schedule(1.0, 10, 10)
    np.testing.assert_allclose(
        [float(s1(t)) for t in range(10)], [t / 10 for t in range(10)], atol=1e-6
    )


def test_scaled_lr():
    assert optim.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert optim.scaled_lr(0.1, 256) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="0"):
        optim.scaled_lr(1e-3, 0)


@pytest.mark.parametrize(
    "args, bad",
    [
        ((1.0, 10, 11), "11"),
        ((-1.0, 10, 1), "-1.0"),
        ((1.0, 0, 0), "total_steps"),
        ((1.0, 10, -1), "-1"),
        ((float("nan"), 10, 1), "nan"),
    ],
)
def test_schedule_rejects_bad_values(args, bad):
    with pytest.raises(ValueError, match=bad):
        optim.warmup_cosine_schedule(*args)


# ----------------------------------------------------------------------------- decay mask


def test_weight_decay_mask_pretraining_rule():
    m = by_name(optim.weight_decay_mask(vit_tree(depth=2)))
    assert m["cls_token"] and m["pos_embed"]  # [1,1,D] / [1,L,D] are decayed in pretraining
    assert m["patch_embed.proj.kernel"] and m["blocks.1.attn.qkv.kernel"] and m["head.kernel"]
    for k in (
        "patch_embed.proj.bias",
        "blocks.0.norm1.scale",
        "blocks.0.norm1.bias",
        "blocks.1.mlp.fc2.bias",
        "fc_norm.scale",
        "head.bias",
    ):
        assert m[k] is False, k
    assert sum(m.values()) == 4 + 4 * 2  # cls, pos, patch kernel, head + 4 kernels per block


def test_weight_decay_mask_finetune_exclude():
    m = by_name(optim.weight_decay_mask(vit_tree(depth=2), exclude=("cls_token", "pos_embed")))
    assert not m["cls_token"] and not m["pos_embed"]
    assert m["patch_embed.proj.kernel"] and m["blocks.0.mlp.fc1.kernel"]
    # full dotted paths and prefixes work too
    m2 = by_name(optim.weight_decay_mask(vit_tree(depth=2), exclude=("blocks.0", "head.kernel")))
    assert not m2["blocks.0.attn.qkv.kernel"] and m2["blocks.1.attn.qkv.kernel"]
    assert not m2["head.kernel"] and m2["cls_token"]
    with pytest.raises(ValueError, match="cls_token"):
        optim.weight_decay_mask(vit_tree(depth=1), exclude="cls_token")


def test_mask_and_layer_ids_on_nnx_state():
    state = nnx.state(_TinyVit(3, 4, nnx.Rngs(0)), nnx.Param)
    m = by_name(optim.weight_decay_mask(state))
    assert m == {
        "blocks.0.mlp.bias": False,
        "blocks.0.mlp.kernel": True,
        "blocks.0.norm1.bias": False,
        "blocks.0.norm1.scale": False,
        "blocks.1.mlp.bias": False,
        "blocks.1.mlp.kernel": True,
        "blocks.1.norm1.bias": False,
        "blocks.1.norm1.scale": False,
        "blocks.2.mlp.bias": False,
        "blocks.2.mlp.kernel": True,
        "blocks.2.norm1.bias": False,
        "blocks.2.norm1.scale": False,
        "cls_token": True,
        "head.bias": False,
        "head.kernel": True,
        "norm.bias": False,
        "norm.scale": False,
        "patch_embed.bias": False,
        "patch_embed.kernel": True,
    }
    ids = by_name(optim.layer_ids(state, 3))
    assert ids["cls_token"] == 0 and ids["patch_embed.kernel"] == 0
    assert ids["blocks.0.mlp.kernel"] == 1 and ids["blocks.2.norm1.bias"] == 3
    assert ids["norm.scale"] == 4 and ids["head.bias"] == 4


# ----------------------------------------------------------------------------- layer decay


def test_layer_ids_and_scales_vit_base_depth():
    tree = vit_tree(depth=12)
    ids = by_name(optim.layer_ids(tree, 12))
    scales = by_name(optim.layerwise_lr_scales(tree, 12, 0.65))
    for k in ("cls_token", "pos_embed", "patch_embed.proj.kernel", "patch_embed.proj.bias"):
        assert ids[k] == 0
        assert scales[k] == pytest.approx(0.65**13)
    for i in range(12):
        for k in ("norm1.scale", "attn.qkv.kernel", "mlp.fc2.bias"):
            assert ids[f"blocks.{i}.{k}"] == i + 1
            assert scales[f"blocks.{i}.{k}"] == pytest.approx(0.65 ** (12 - i))
    assert scales["blocks.0.attn.qkv.kernel"] == pytest.approx(0.65**12)
    assert scales["blocks.11.attn.qkv.kernel"] == pytest.approx(0.65)
    for k in ("fc_norm.scale", "fc_norm.bias", "head.kernel", "head.bias"):
        assert ids[k] == 13 and scales[k] == 1.0


def test_layer_ids_reject_bad_values():
    with pytest.raises(ValueError, match="num_layers=2"):
        optim.layer_ids(vit_tree(depth=3), 2)
    with pytest.raises(ValueError, match="1.5"):
        optim.layerwise_lr_scales(vit_tree(depth=1), 1, 1.5)
    with pytest.raises(ValueError, match="-1"):
        optim.layer_ids(vit_tree(depth=1), -1)


# ----------------------------------------------------------------------------- LARS


def lars_reference(params, grads_seq, lr, momentum, wd, trust):
    """util/lars.py in numpy, over a dict of arrays."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    for grads in grads_seq:
        for k in p:
            dp = np.array(grads[k], np.float64)
            if p[k].ndim > 1:
                dp = dp + wd * p[k]
                pn, un = np.linalg.norm(p[k]), np.linalg.norm(dp)
                q = trust * pn / un if (pn > 0 and un > 0) else 1.0
                dp = dp * q
            mu[k] = momentum * mu[k] + dp
            p[k] = p[k] - lr * mu[k]
    return p


def test_lars_hand_computed_one_step():
    # kernel [[3, 0], [0, 4]] has |p| = 5; grad [[0, 1], [1, 0]] + 0.5 p = [[1.5,1],[1,2]]
    params = {"w": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "b": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([[0.0, 1.0], [1.0, 0.0]]), "b": jnp.array([0.5, 0.25])}
    tx = optim.lars(0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=0.01)
    upd, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    dp = np.array([[1.5, 1.0], [1.0, 2.0]])
    q = 0.01 * 5.0 / np.sqrt(1.5**2 + 1 + 1 + 4)
    np.testing.assert_allclose(
        new["w"], np.array([[3.0, 0.0], [0.0, 4.0]]) - 0.1 * q * dp, rtol=1e-6
    )
    # 1-D param: plain SGD step, no decay, no ratio
    np.testing.assert_allclose(new["b"], [1.0 - 0.05, -2.0 - 0.025], rtol=1e-6)


def test_lars_two_steps_with_zero_norm_param():
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "zero_w": jnp.zeros((2, 3)),  # |p| = 0 -> ratio 1
        "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        "tok": jnp.asarray(rng.normal(size=(1, 1, 4)), jnp.float32),
    }
    grads_seq = [
        {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
        for _ in range(2)
    ]
    grads_seq[1]["w"] = jnp.zeros((3, 4))  # |g + wd p| > 0 still (wd > 0)
    tx = optim.lars(0.2, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001)
    state = tx.init(params)
    p = params
    step = jax.jit(tx.update)
    for i, grads in enumerate(grads_seq):
        upd, state = step(grads, state, p)
        p = optax.apply_updates(p, upd)
        ref = lars_reference(params, grads_seq[: i + 1], 0.2, 0.9, 0.1, 0.001)
        for k in params:
            np.testing.assert_allclose(p[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=f"{k} step {i}")
    # zero-norm param moves by the unscaled gradient (ratio 1)
    ref1 = lars_reference(params, grads_seq[:1], 0.2, 0.9, 0.1, 0.001)
    np.testing.assert_allclose(ref1["zero_w"], -0.2 * np.asarray(grads_seq[0]["zero_w"]), rtol=1e-6)


def test_lars_zero_gradient_and_zero_param_is_noop():
    params = {"w": jnp.zeros((2, 2))}
    tx = optim.lars(1.0, weight_decay=0.0)
    upd, _ = tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)
    assert np.all(np.isfinite(upd["w"])) and np.all(upd["w"] == 0)


def test_create_optimizer_lars_with_schedule():
    cfg = schema.defaults(schema.OPTIM)
    cfg.update(
        name="lars",
        base_lr=0.1,
        weight_decay=0.0,
        momentum=0.9,
    )
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}
    grads_seq = [{"w": jnp.full((2, 3), 0.5), "b": jnp.full((3,), 0.5)}] * 3
    sched = optim.warmup_cosine_schedule(optim.peak_learning_rate(cfg, 512), 10, 2)
    tx = optim.create_optimizer(cfg, sched, params)
    state, p = tx.init(params), params
    pr = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in pr.items()}
    for t, grads in enumerate(grads_seq):
        upd, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, upd)
        lr = official_lr(t, 0.2, 10, 2)
        for k in pr:
            dp = np.asarray(grads[k], np.float64)
            if pr[k].ndim > 1:
                dp = dp * 0.001 * np.linalg.norm(pr[k]) / np.linalg.norm(dp)
            mu[k] = 0.9 * mu[k] + dp
            pr[k] = pr[k] - lr * mu[k]
            np.testing.assert_allclose(p[k], pr[k], rtol=1e-5, err_msg=f"{k} step {t}")
        assert float(sched(t)) == pytest.approx(lr, rel=1e-6)


# ----------------------------------------------------------------------------- AdamW


def adamw_reference(params, grads_seq, lr_fn, b1, b2, eps, wd, decay, scale):
    """torch.optim.AdamW per param group (lr * lr_scale, weight_decay or 0), in numpy."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_seq):
        for k in p:
            lr = lr_fn(t) * scale[k]
            g = np.asarray(grads[k], np.float64)
            p[k] = p[k] * (1 - lr * (wd if decay[k] else 0.0))
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            mhat = m[k] / (1 - b1 ** (t + 1))
            vhat = v[k] / (1 - b2 ** (t + 1))
            p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_adamw_matches_reference(layer_decay):
    depth = 2
    params = vit_tree(depth=depth, rng=np.random.default_rng(2))
    rng = np.random.default_rng(3)
    grads_seq = [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        for _ in range(3)
    ]
    cfg = schema.defaults(schema.OPTIM)
    cfg.update(
        base_lr=5e-2,
        min_lr=1e-3,
        b1=0.9,
        b2=0.999,
        weight_decay=0.3,
        no_decay_names=("cls_token", "pos_embed"),
        layer_decay=layer_decay,
        num_layers=depth,
    )
    sched = optim.warmup_cosine_schedule(optim.peak_learning_rate(cfg, 512), 6, 2, 1e-3)
    tx = optim.create_optimizer(cfg, sched, params)
    state, p = tx.init(params), params
    step = jax.jit(tx.update)

    def flat(tree):
        return by_name(tree)

    decay = flat(optim.weight_decay_mask(params, ("cls_token", "pos_embed")))
    scale = (
        flat(optim.layerwise_lr_scales(params, depth, layer_decay))
        if layer_decay
        else {k: 1.0 for k in decay}
    )

    def lr_fn(t):
        return official_lr(t, 0.1, 6, 2, 1e-3)

    for t in range(3):
        upd, state = step(grads_seq[t], state, p)
        p = optax.apply_updates(p, upd)
        ref = adamw_reference(
            flat(params),
            [flat(g) for g in grads_seq[: t + 1]],
            lr_fn,
            0.9,
            0.999,
            1e-8,
            0.3,
            decay,
            scale,
        )
        got = flat(p)
        for k in ref:
            np.testing.assert_allclose(
                got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=f"{k} step {t}"
            )
    if layer_decay:  # scales really differ per depth: patch_embed moved less than head

        def d(k):
            return np.abs(got[k] - flat(params)[k]).max()

        assert d("patch_embed.proj.bias") < d("head.bias")
    assert not np.allclose(got["cls_token"], flat(params)["cls_token"])


def test_adamw_on_nnx_state_jit_and_sharded():
    model = _TinyVit(2, 8, nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
    cfg = schema.defaults(schema.OPTIM)
    cfg.update(lr=1e-2, layer_decay=0.5, num_layers=2, grad_clip_norm=1.0)
    tx = optim.create_optimizer(cfg, optim.warmup_cosine_schedule(1e-2, 10, 0), params)
    state = tx.init(params)
    upd, _ = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, upd)
    assert isinstance(new, nnx.State)
    # the same update with params sharded over 8 devices
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

    def shard(x):
        return jax.device_put(
            x, NamedSharding(mesh, P("fsdp") if x.shape and x.shape[0] % 8 == 0 else P())
        )

    sp, sg = jax.tree.map(shard, params), jax.tree.map(shard, grads)
    supd, sstate = jax.jit(tx.update)(sg, tx.init(sp), sp)
    for a, b in zip(jax.tree.leaves(supd), jax.tree.leaves(upd)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(sstate) if x.ndim)
    assert jax.tree.leaves(supd)[-1].sharding.is_equivalent_to(
        jax.tree.leaves(sp)[-1].sharding, jax.tree.leaves(sp)[-1].ndim
    )
    # the updated state merges back into the module (nnx.state shares Variables with it)
    kernel = np.asarray(model.head.kernel[...])
    nnx.update(model, new)
    np.testing.assert_allclose(model.head.kernel[...], kernel + np.asarray(upd["head"]["kernel"]))
    assert not np.allclose(model.head.kernel[...], kernel)


# ----------------------------------------------------------------------------- clipping, lr


def test_grad_clipping_clips():
    cfg = schema.defaults(schema.OPTIM)
    cfg.update(
        name="sgd",
        momentum=0.0,
        weight_decay=0.0,
        grad_clip_norm=1.0,
    )
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
    big = {"w": jnp.full((2, 2), 3.0), "b": jnp.full((2,), 4.0)}  # global norm sqrt(36+32)
    tx = optim.create_optimizer(cfg, 0.5, params)
    upd, _ = tx.update(big, tx.init(params), params)
    norm = math.sqrt(4 * 9 + 2 * 16)
    np.testing.assert_allclose(upd["w"], -0.5 * 3.0 / norm, rtol=1e-6)
    np.testing.assert_allclose(upd["b"], -0.5 * 4.0 / norm, rtol=1e-6)
    np.testing.assert_allclose(float(optax.tree.norm(upd)), 0.5, rtol=1e-6)
    small = {"w": jnp.full((2, 2), 0.1), "b": jnp.full((2,), 0.1)}
    upd, _ = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.05, rtol=1e-6)
    cfg.grad_clip_norm = None  # off
    tx = optim.create_optimizer(cfg, 0.5, params)
    upd, _ = tx.update(big, tx.init(params), params)
    np.testing.assert_allclose(upd["w"], -1.5, rtol=1e-6)


def test_sgd_weight_decay_respects_mask():
    cfg = schema.defaults(schema.OPTIM)
    cfg.update(
        name="sgd",
        momentum=0.0,
        weight_decay=0.1,
        no_decay_names=("cls_token",),
    )
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,)), "cls_token": jnp.ones((1, 1, 2))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = optim.create_optimizer(cfg, 1.0, params)
    upd, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.1)
    np.testing.assert_allclose(upd["b"], 0.0)
    np.testing.assert_allclose(upd["cls_token"], 0.0)


def test_peak_learning_rate_scaling_and_absolute():
    cfg = schema.defaults(schema.OPTIM)
    assert cfg.name == "adamw" and cfg.base_lr == 1.5e-4 and (cfg.b1, cfg.b2) == (0.9, 0.95)
    assert cfg.weight_decay == 0.05 and cfg.eps == 1e-8 and cfg.min_lr == 0.0
    assert cfg.grad_clip_norm is None and cfg.lr is None and cfg.layer_decay is None
    assert optim.peak_learning_rate(cfg, 4096) == pytest.approx(1.5e-4 * 4096 / 256)
    cfg.lr = 3e-3
    assert optim.peak_learning_rate(cfg, 4096) == 3e-3


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "override, bad",
    [
        ({"name": "adam_typo"}, "adam_typo"),
        ({"lr": -0.1}, "-0.1"),
        ({"base_lr": -1e-3}, "-0.001"),
        ({"b2": 1.0}, "b2"),
        ({"layer_decay": 0.75}, "num_layers"),
        ({"layer_decay": 0.0, "num_layers": 2}, "layer_decay"),
        ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
        ({"batch_size": 512}, "optim.batch_size is set by the run's plan.*config.batch_size"),
        ({"total_steps": 10}, "optim.total_steps is set by the run's plan"),
    ],
)
def test_bad_config_raises(override, bad):
    cfg = schema.defaults(schema.OPTIM)
    cfg.unlock().update(override)
    with pytest.raises(ValueError, match=bad):
        optim.create_optimizer(cfg, 1e-3, vit_tree(depth=2))


def test_unknown_config_key_and_depth_mismatch():
    cfg = schema.defaults(schema.OPTIM)
    cfg.weight_decy = 0.1
    with pytest.raises(ValueError, match="weight_decy"):
        optim.create_optimizer(cfg, 1e-3)
    cfg = schema.defaults(schema.OPTIM)
    cfg.update(layer_decay=0.75, num_layers=2)
    with pytest.raises(ValueError, match="blocks.2.* in block 2"):
        optim.create_optimizer(cfg, 1e-3, vit_tree(depth=4))


@pytest.mark.parametrize("name", ["adamw", "lars", "sgd"])
def test_stacked_blocks_get_the_per_block_rules(name):
    # scan_layers stores the blocks stacked: weight decay, LARS norms and layer-wise lr
    # decay must still act per block, as on the per-block layout.
    from mae_jax.models import layout
    from mae_jax.models.classifier import create_classifier

    model = create_classifier("mae_vit_test", 5, seed=0, scan_layers=True)
    stacked = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    per_block = layout.convert(stacked, stacked=False)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01) + 0.1 * x, stacked)
    cfg = schema.defaults(schema.OPTIM)
    cfg.name, cfg.lr, cfg.weight_decay = name, 1e-2, 0.05
    cfg.layer_decay, cfg.num_layers = 0.75, model.config.depth
    results = []
    for params, g in ((stacked, grads), (per_block, layout.convert(grads, stacked=False))):
        tx = optim.create_optimizer(cfg, optim.warmup_cosine_schedule(1e-2, 10, 0), params)
        # jitted: one compile costs less than the eager op-by-op compiles over ~40 shapes
        updates, _ = jax.jit(tx.update)(g, tx.init(params), params)
        results.append(updates)
    got = layout.convert(results[0], stacked=False)
    assert jax.tree.structure(got) == jax.tree.structure(results[1])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    mask = optim.weight_decay_mask(stacked)
    assert mask["blocks"]["attn"]["qkv"]["kernel"] and not mask["blocks"]["attn"]["qkv"]["bias"]
    ids = optim.layer_ids(stacked, model.config.depth)
    np.testing.assert_array_equal(ids["blocks"]["norm1"]["scale"], [1, 2])
