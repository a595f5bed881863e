"""ViT classifier for fine-tuning / linear probing: shapes, timm names, weight transfer from MAE,
drop path, BatchNorm head, layer-wise lr decay."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from config_files import UNOPTIMIZED
from flax import nnx

from mae_jax import init_from, models, ops, optim, schema
from mae_jax import workdir as wdir
from mae_jax.models.classifier import ENCODER_KEYS, ViTClassifier, create_classifier
from mae_jax.models.encoder import drop_path_rates
from mae_jax.models.vit import FixedEmbedding


def images(n=4, seed=0):  # one batch size everywhere: eager ops compile once
    return jax.random.normal(jax.random.key(seed), (n, 32, 32, 3))


def take_encoder(clf: ViTClassifier, mae) -> ViTClassifier:
    """Copy the MAE's `ENCODER_KEYS` subtrees (and `norm` for cls pooling) into `clf`, in place:
    the top-level names `init_from.load` copies (`tasks.classify.encoder_keys`)."""
    keys = ENCODER_KEYS + (() if clf.global_pool else ("norm",))
    params = nnx.state(mae, nnx.Param)
    nnx.update(clf, nnx.State({k: params[k] for k in keys}))
    return clf


def param_names(model):
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_shapes_and_dtypes():
    x = images()
    for kw, train in (
        (dict(), True),
        (dict(global_pool=False, linear_probe=True), True),
        (dict(dtype="bfloat16", drop_path_rate=0.1), False),
    ):
        clf = create_classifier("mae_vit_test", 10, **kw)
        if kw.get("dtype") == "bfloat16":  # jitted: its ops serve no other test (4.9 -> 1.3 s)
            logits, feats = nnx.jit(lambda m, x: (m(x, train=False), m.features(x)))(clf, x)
        else:  # eager: the later tests' eager calls reuse these ops
            logits, feats = clf(x, train=train), clf.features(x)
        assert logits.shape == (4, 10) and logits.dtype == jnp.float32
        assert feats.shape == (4, 32) and feats.dtype == jnp.float32


def test_param_names_mirror_timm():
    gap = create_classifier("mae_vit_test", 10)
    names = param_names(gap)
    assert {
        "fc_norm.scale",
        "fc_norm.bias",
        "head.kernel",
        "head.bias",
        "cls_token",
        "patch_embed.proj.kernel",
        "blocks.1.attn.qkv.kernel",
    } <= names
    assert not any(n.startswith("norm.") or "decoder" in n or "mask_token" in n for n in names)
    assert gap.head.kernel.get_value().shape == (32, 10)

    cls = create_classifier("mae_vit_test", 10, global_pool=False)
    names = param_names(cls)
    assert {"norm.scale", "norm.bias"} <= names and not any("fc_norm" in n for n in names)

    probe = create_classifier("mae_vit_test", 10, global_pool=False, linear_probe=True)
    names = param_names(probe)
    # head.0 = BatchNorm without affine (no params, running stats only), head.1 = Linear
    assert {n for n in names if n.startswith("head")} == {"head.1.kernel", "head.1.bias"}
    stats = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(probe, nnx.BatchStat))}
    assert stats == {"head.0.mean", "head.0.var"}
    bn = probe.head[0]
    assert bn.epsilon == 1e-6 and bn.momentum == pytest.approx(0.9)

    # fixed sin-cos position embeddings, not a parameter
    assert isinstance(gap.pos_embed, FixedEmbedding) and not isinstance(gap.pos_embed, nnx.Param)
    np.testing.assert_array_equal(gap.pos_embed.get_value()[0], ops.sincos_2d(32, 4))


def test_head_init_official():
    ft = create_classifier("mae_vit_test", 1000, seed=1)
    k = np.asarray(ft.head.kernel.get_value())
    np.testing.assert_allclose(k.std(), 2e-5, rtol=0.05)
    np.testing.assert_array_equal(ft.head.bias.get_value(), 0.0)
    lp = create_classifier("mae_vit_test", 1000, seed=1, linear_probe=True)
    np.testing.assert_allclose(np.asarray(lp.head[1].kernel.get_value()).std(), 0.01, rtol=0.05)
    np.testing.assert_array_equal(lp.head[1].bias.get_value(), 0.0)
    # fc_norm starts as the identity affine
    np.testing.assert_array_equal(ft.fc_norm.scale.get_value(), 1.0)


def test_encoder_copied_from_mae_matches_encode():
    mae = models.create("mae_vit_test", seed=3)
    x = images(seed=1)
    encoded = mae.encode(x)  # [N, 1+L, D], after the final norm

    cls = take_encoder(create_classifier("mae_vit_test", 10, global_pool=False, seed=9), mae)
    # the shared encoder: bit-identical tokens
    np.testing.assert_array_equal(cls.norm(cls.tokens(x)), encoded)
    np.testing.assert_array_equal(cls.features(x), encoded[:, 0])

    gap = take_encoder(create_classifier("mae_vit_test", 10, seed=9), mae)
    # the same encoder; fc_norm is new (identity-initialized LayerNorm) on the mean patch token
    tokens = gap.tokens(x)
    np.testing.assert_array_equal(cls.tokens(x), tokens)
    pooled = tokens[:, 1:].mean(1)
    ref = (pooled - pooled.mean(-1, keepdims=True)) / jnp.sqrt(pooled.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(gap.features(x), ref, rtol=1e-4, atol=1e-4)

    # the copied parameters are equal; the head is not touched by the copy
    src = nnx.to_pure_dict(nnx.state(mae, nnx.Param))
    dst = nnx.to_pure_dict(nnx.state(gap, nnx.Param))
    for key in ("cls_token", "patch_embed", "blocks"):
        jax.tree.map(np.testing.assert_array_equal, src[key], dst[key])
    fresh = create_classifier("mae_vit_test", 10, seed=9)
    np.testing.assert_array_equal(gap.head.kernel.get_value(), fresh.head.kernel.get_value())

    # another resolution: fixed sin-cos recomputed for the grid, same encoder weights
    big = take_encoder(create_classifier("mae_vit_test", 10, img_size=48, global_pool=False), mae)
    assert big.config.img_size == 48 and big.pos_embed.get_value().shape == (1, 37, 32)
    np.testing.assert_array_equal(
        big.blocks[0].attn.qkv.kernel.get_value(), mae.blocks[0].attn.qkv.kernel.get_value()
    )


def test_init_from_loads_the_encoder_like_the_tasks(tmp_path):
    """The product path: a weights workdir, `init_from.locate` / `load` of the encoder keys."""
    mae = models.create("mae_vit_test", seed=3)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(mae, nnx.Param)))
    meta = {"model": dataclasses.asdict(mae.config), "kind": "weights", "source": "test"}
    wdir.write_weights(str(tmp_path / "pre"), {"params": params}, meta)
    cfg = schema.defaults(schema.INIT_FROM)
    cfg.path, cfg.parts = str(tmp_path / "pre"), "encoder"
    source = init_from.locate(cfg)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def load(clf, keys):
        state = {"params": nnx.state(clf, nnx.Param)}
        shardings = {"params": jax.tree.map(lambda _: one, state["params"])}
        loaded = init_from.load(state, shardings, source, keys, clf.config)
        nnx.update(clf, loaded["params"])
        return clf

    clf = create_classifier("mae_vit_test", 10, global_pool=False, seed=9)
    keys = init_from.wanted_keys(source, list(nnx.to_pure_dict(nnx.state(clf, nnx.Param))))
    assert keys == ENCODER_KEYS + ("norm",)
    load(clf, keys)
    ref = take_encoder(create_classifier("mae_vit_test", 10, global_pool=False, seed=9), mae)
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(clf, nnx.Param)),
        nnx.to_pure_dict(nnx.state(ref, nnx.Param)),
    )
    x = images(seed=1)
    np.testing.assert_array_equal(clf(x, train=False), ref(x, train=False))

    # global pooling has no `norm` to take (another architecture is refused before loading,
    # by `tasks.classify.resolve_model`)
    with pytest.raises(ValueError, match=r"no parameters \['norm'\]"):
        load(create_classifier("mae_vit_test", 10), keys)


def test_drop_path_rates_and_eval_is_deterministic():
    assert drop_path_rates(0.1, 3) == pytest.approx([0.0, 0.05, 0.1])
    # 12 blocks at the test model's widths (the rates depend on the depth only)
    clf = create_classifier("mae_vit_test", 5, drop_path_rate=0.3, depth=12)
    rates = [float(b.drop_path.rate.get_value()) for b in clf.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, 12), rtol=1e-6)

    clf = create_classifier("mae_vit_test", 10, seed=2, drop_path_rate=0.5)
    plain = create_classifier("mae_vit_test", 10, seed=2)
    nnx.update(plain, nnx.state(clf, nnx.Param))
    x = images()
    a, b = clf(x, train=False), clf(x, train=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, plain(x, train=False), rtol=1e-6, atol=1e-7)
    t1, t2 = clf.features(x, train=True), clf.features(x, train=True)
    assert not np.allclose(t1, t2) and not np.allclose(t1, clf.features(x))
    np.testing.assert_array_equal(clf(x, train=False), a)  # eval again after training calls


def test_linear_probe_batchnorm_train_and_eval():
    clf = create_classifier("mae_vit_test", 10, global_pool=False, linear_probe=True)
    x = images()
    feats = clf.features(x)
    bn = clf.head[0]
    clf(x, train=True)
    np.testing.assert_allclose(bn.mean.get_value(), 0.1 * feats.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.var.get_value(), 0.9 + 0.1 * feats.var(0), rtol=1e-4)
    # train: batch statistics; eval: running statistics
    normed = bn(feats, use_running_average=False)
    np.testing.assert_allclose(normed.mean(0), 0.0, atol=1e-4)
    expected = (feats - bn.mean.get_value()) / jnp.sqrt(bn.var.get_value() + 1e-6)
    lin = clf.head[1]
    np.testing.assert_allclose(clf(x, train=False), lin(expected), rtol=1e-4, atol=1e-5)


def test_layerwise_lr_decay_scales_per_depth():
    depth, decay = 2, 0.65
    clf = create_classifier("mae_vit_test", 10)
    scales = optim.layerwise_lr_scales(nnx.state(clf, nnx.Param), depth, decay)
    by_name = {}
    for path, v in jax.tree_util.tree_flatten_with_path(nnx.state(clf, nnx.Param))[0]:
        by_name[".".join(optim.path_names(path))] = v
    scale_of = {
        ".".join(optim.path_names(p)): s for p, s in jax.tree_util.tree_flatten_with_path(scales)[0]
    }
    assert set(scale_of) == set(by_name)
    for name, s in scale_of.items():
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            assert s == pytest.approx(decay ** (depth - i)), name
        elif name.startswith(("cls_token", "patch_embed")):
            assert s == pytest.approx(decay ** (depth + 1)), name
        else:  # fc_norm, head
            assert name.startswith(("fc_norm", "head")) and s == pytest.approx(1.0), name

    # through the optimizer: equal gradients give updates scaled per depth
    cfg = schema.defaults(schema.OPTIM)
    cfg.name, cfg.weight_decay = "sgd", 0.0
    cfg.momentum, cfg.layer_decay, cfg.num_layers = 0.0, decay, depth
    params = nnx.state(clf, nnx.Param)
    tx = optim.create_optimizer(cfg, 1.0, params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    up = {
        ".".join(optim.path_names(p)): float(np.asarray(u).ravel()[0])
        for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    assert up["blocks.0.mlp.fc1.kernel"] == pytest.approx(-(decay**2))
    assert up["blocks.1.norm1.scale"] == pytest.approx(-decay)
    assert up["head.kernel"] == pytest.approx(-1.0)


def test_jitted_finetune_step_grads_reach_every_param():
    # rate 0.5 for the last block: a new draw of its 4 x 2 masks is unlikely to repeat the first
    clf = create_classifier("mae_vit_test", 10, drop_path_rate=0.5)
    graphdef, params, rest = nnx.split(clf, nnx.Param, ...)
    x = images()
    y = jnp.array([0, 1, 2, 9])

    @functools.partial(jax.jit, compiler_options=UNOPTIMIZED)
    def grads(params, rest):
        def loss_fn(p, rest):
            # copy=True: the merged model owns fresh Variables, so drop path may advance
            # its RNG counter inside the grad trace; the new RNG state comes back as aux.
            model = nnx.merge(graphdef, p, rest, copy=True)
            logits = model(x, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        return jax.grad(loss_fn, has_aux=True)(params, rest)

    g, new_rest = grads(params, rest)
    g2, _ = grads(params, new_rest)  # the advanced dropout stream draws new drop masks
    assert not np.allclose(g["head"]["kernel"].get_value(), g2["head"]["kernel"].get_value())
    for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
        assert float(jnp.abs(leaf).sum()) > 0, f"no gradient reaches {path}"
    assert not any(
        "pos_embed" in ".".join(optim.path_names(p))
        for p, _ in jax.tree_util.tree_flatten_with_path(g)[0]
    )


def test_bad_arguments():
    cfg = models.resolve("mae_vit_test")
    with pytest.raises(ValueError, match="num_classes"):
        ViTClassifier(cfg, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="drop_path_rate"):
        ViTClassifier(cfg, 3, drop_path_rate=1.0, rngs=nnx.Rngs(0))
    clf = create_classifier("mae_vit_test", 3)
    with pytest.raises(ValueError, match="built for 32x32"):
        clf(jnp.zeros((1, 64, 64, 3)), train=False)
    with pytest.raises(ValueError, match="NHWC"):
        clf(jnp.zeros((1, 3, 32, 32)), train=False)
    with pytest.raises(ValueError, match="train must be True or False"):
        clf(jnp.zeros((1, 32, 32, 3)), train=None)


def test_stacked_blocks_with_drop_path():
    # Same parameters in both layouts: same logits in eval; in training, drop path draws
    # (one key per block, from the reseeded stream) make both differ from eval.
    x = images()
    loop = create_classifier("mae_vit_test", 10, seed=1, drop_path_rate=0.4)
    scan = create_classifier("mae_vit_test", 10, seed=1, drop_path_rate=0.4, scan_layers=True)
    np.testing.assert_allclose(scan(x, train=False), loop(x, train=False), rtol=1e-5, atol=1e-7)
    rates = scan.blocks.drop_path.rate.get_value()
    np.testing.assert_allclose(rates, [0.0, 0.4], rtol=1e-6)
    for model in (loop, scan):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, key, g=graphdef, r=rest):
            m = nnx.merge(g, p, r, copy=True)
            nnx.reseed(m, dropout=key, policy="match_shape")
            return jnp.sum(m(x, train=True) ** 2)

        # jitted, the key an argument: one compile per layout serves the three calls
        loss_and_grads = jax.jit(jax.value_and_grad(loss), compiler_options=UNOPTIMIZED)
        a, grads = loss_and_grads(params, jax.random.key(7))
        assert np.isfinite(a) and float(a) == float(loss_and_grads(params, jax.random.key(7))[0])
        assert float(a) != float(loss_and_grads(params, jax.random.key(8))[0])
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
