"""The NNX MAE model: presets, parameter counts, forward semantics, gradients, bad input."""

import dataclasses
import functools
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from config_files import UNOPTIMIZED
from flax import nnx

from mae_jax import models, ops, schema
from mae_jax.models import layout, vit
from mae_jax.models.vit import FixedEmbedding

# Trainable parameter counts of the official models (facebookresearch/mae models_mae.py built in
# PyTorch: the sum of numel() over parameters with requires_grad).
OFFICIAL_TRAINABLE = {
    "mae_vit_base_patch16": 111_655_680,
    "mae_vit_large_patch16": 329_239_296,
    "mae_vit_huge_patch14": 656_613_964,
}


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(OFFICIAL_TRAINABLE))
def test_paper_presets_have_official_trainable_counts(name):
    abstract = nnx.eval_shape(lambda: models.create(name))
    assert count(nnx.state(abstract, nnx.Param)) == OFFICIAL_TRAINABLE[name]
    # position embeddings are fixed tables, not parameters: [1, 1+L, D]
    cfg = abstract.config
    assert abstract.pos_embed.shape == (1, 1 + cfg.num_patches, cfg.embed_dim)
    assert abstract.decoder_pos_embed.shape == (1, 1 + cfg.num_patches, cfg.decoder_embed_dim)


def test_position_embeddings_are_fixed_sincos():
    m = models.create("mae_vit_test")
    np.testing.assert_array_equal(
        np.asarray(m.pos_embed.get_value())[0], ops.sincos_2d(32, m.config.grid_size)
    )
    assert isinstance(m.pos_embed, FixedEmbedding) and not isinstance(m.pos_embed, nnx.Param)


def test_parameter_tree_is_flat_with_official_names():
    """The shared `Encoder` adds no nesting level: checkpoints and converters rely on it."""
    m = nnx.eval_shape(lambda: models.create("mae_vit_test"))
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    assert set(params) == {
        "patch_embed",
        "cls_token",
        "blocks",
        "norm",
        "decoder_embed",
        "mask_token",
        "decoder_blocks",
        "decoder_norm",
        "decoder_pred",
    }
    assert set(params["blocks"]) == {0, 1} and set(params["patch_embed"]) == {"proj"}
    assert set(params["blocks"][0]) == {"norm1", "attn", "norm2", "mlp"}
    fixed = nnx.to_pure_dict(nnx.state(m, FixedEmbedding))
    assert set(fixed) == {"pos_embed", "decoder_pos_embed"}


def test_official_initialization():
    # the preset's widths (the statistics need them); 2 blocks of each stack, not 12 and 8;
    # initialized in one unoptimized program (the values of an eager init, in half the time)
    def create():
        return models.create("mae_vit_small_patch16", seed=1, depth=2, decoder_depth=2)

    graphdef = nnx.graphdef(nnx.eval_shape(create))
    m = nnx.merge(graphdef, jax.jit(lambda: nnx.state(create()), compiler_options=UNOPTIMIZED)())
    blk = m.blocks[0]
    np.testing.assert_array_equal(blk.attn.qkv.bias.get_value(), 0.0)
    np.testing.assert_array_equal(blk.norm1.scale.get_value(), 1.0)
    np.testing.assert_array_equal(blk.norm1.bias.get_value(), 0.0)
    # xavier-uniform: limit sqrt(6 / (fan_in + fan_out)) for fc1 [384, 1536]
    k = np.asarray(blk.mlp.fc1.kernel.get_value())
    limit = np.sqrt(6 / (384 + 1536))
    assert np.abs(k).max() <= limit and np.abs(k).max() > 0.95 * limit
    np.testing.assert_allclose(k.std(), limit / np.sqrt(3), rtol=0.02)
    for tok in (m.cls_token, m.mask_token):
        np.testing.assert_allclose(np.asarray(tok.get_value()).std(), 0.02, rtol=0.25)
    # patch embedding: xavier on the flattened conv kernel, PyTorch default conv bias
    pe = np.asarray(m.patch_embed.proj.kernel.get_value())
    assert np.abs(pe).max() <= np.sqrt(6 / (768 + 384))
    bias = np.asarray(m.patch_embed.proj.bias.get_value())
    assert 0 < np.abs(bias).max() <= 1 / np.sqrt(768)


# Eager forwards of the test model all take a batch of 2 (`images_and_noise`): the ops they
# compile for one test serve the next ones.
def images_and_noise():
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    return images, jax.random.uniform(jax.random.key(1), (2, 16))


def test_forward_outputs_and_noise_determinism():
    m = models.create("mae_vit_test", seed=0)
    images, noise = images_and_noise()
    out = m(images, noise=noise)
    assert out.loss.shape == () and out.loss.dtype == jnp.float32
    assert out.pred.shape == (2, 16, 8 * 8 * 3)
    assert out.mask.shape == (2, 16) and out.ids_restore.shape == (2, 16)
    np.testing.assert_array_equal(out.mask.sum(1), 16 - int(16 * 0.25))
    again = m(images, noise=noise)
    np.testing.assert_array_equal(out.pred, again.pred)
    _, mask, ids_restore = ops.random_masking(2, 16, 0.75, noise=noise)
    np.testing.assert_array_equal(out.mask, mask)
    np.testing.assert_array_equal(out.ids_restore, ids_restore)
    # own stream: successive calls draw new masks; mask_ratio override
    a, b = m(images), m(images)
    assert not np.array_equal(a.mask, b.mask)
    assert int(m(images, mask_ratio=0.5).mask[0].sum()) == 8
    c = m(images, rngs=nnx.Rngs(masking=5))
    d = m(images, rngs=nnx.Rngs(masking=5))
    np.testing.assert_array_equal(c.mask, d.mask)


def test_visible_only_embedding_equals_embed_then_gather():
    m = models.create("mae_vit_test", seed=0)
    images, _ = images_and_noise()
    patches = ops.patchify(images, 8)
    ids_keep, _, _ = ops.random_masking(2, 16, 0.75, key=jax.random.key(2))
    full = m.embed(patches)
    np.testing.assert_allclose(
        m.embed(patches, ids_keep), ops.gather_tokens(full, ids_keep), rtol=1e-6, atol=1e-6
    )


def test_loss_is_masked_mse_of_pred():
    m = models.create("mae_vit_test", seed=0, norm_pix_loss=True)
    images, noise = images_and_noise()
    out = m(images, noise=noise)
    target = ops.normalize_targets(ops.patchify(images, 8))
    per = ((out.pred - target) ** 2).mean(-1)
    np.testing.assert_allclose(out.loss, (per * out.mask).sum() / out.mask.sum(), rtol=1e-5)


def test_encode_shape_and_no_masking():
    m = models.create("mae_vit_test")
    feats = m.encode(jnp.zeros((2, 32, 32, 3)))
    assert feats.shape == (2, 17, 32)


def _loss_and_grads(model, images, noise):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = jax.jit(
        jax.value_and_grad(
            lambda p, g=graphdef, r=rest: nnx.merge(g, p, r)(images, noise=noise).loss
        ),
        compiler_options=UNOPTIMIZED,
    )
    return f(params)


@functools.cache
def _remat_inputs_and_reference():
    """The inputs, and the loss and gradients of the plain model (computed once per session)."""
    images, noise = images_and_noise()
    return images, noise, _loss_and_grads(models.create("mae_vit_test", seed=0), images, noise)


def test_gradients_reach_every_param_and_no_pos_embed():
    # the plain model's gradients of the remat test below (one compile serves both)
    _, _, (_, grads) = _remat_inputs_and_reference()
    params = nnx.state(nnx.eval_shape(lambda: models.create("mae_vit_test")), nnx.Param)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(nnx.to_flat_state(params))
    for path, g in flat:
        value = g.get_value() if hasattr(g, "get_value") else g
        assert float(jnp.abs(value).sum()) > 0, f"no gradient reaches {path}"
    names = {"/".join(map(str, p)) for p, _ in flat}
    assert not any("pos_embed" in n for n in names)
    assert "cls_token" in names and "mask_token" in names


@pytest.mark.parametrize(
    "remat, scan",
    # Every policy on the scanned blocks; the per-block remat wrapper once (with any policy it is
    # the same call; 'none' per block is the reference itself).
    [("none", True), ("full", True), ("dots_no_batch", True), ("dots", True), ("full", False)],
)
def test_remat_policies_and_scanned_layers_give_same_loss_and_grads(remat, scan):
    images, noise, base = _remat_inputs_and_reference()
    m = models.create("mae_vit_test", seed=0, remat=remat, scan_layers=scan)
    loss, grads = _loss_and_grads(m, images, noise)
    np.testing.assert_allclose(loss, base[0], rtol=1e-6)
    grads = layout.convert(nnx.to_pure_dict(grads), stacked=False)
    want = nnx.to_pure_dict(base[1])
    assert jax.tree.structure(grads) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_stacked_blocks_hold_the_same_initial_values_with_a_layers_axis():
    loop = models.create("mae_vit_test", seed=3)
    scan = models.create("mae_vit_test", seed=3, scan_layers=True)
    assert isinstance(scan.blocks, vit.Block) and isinstance(scan.decoder_blocks, vit.Block)
    qkv = scan.blocks.attn.qkv.kernel
    assert qkv.get_value().shape == (2, 32, 96)
    assert qkv.get_metadata()["logical_axes"] == (None, "embed", "qkv")
    per_block = layout.convert(nnx.to_pure_dict(nnx.state(scan, nnx.Param)), stacked=False)
    want = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, per_block, want)
    back = layout.convert(want, stacked=True)
    jax.tree.map(np.testing.assert_array_equal, back, nnx.to_pure_dict(nnx.state(scan, nnx.Param)))
    assert layout.layout_of(back) is True and layout.layout_of(want) is False


def _count(jaxpr, primitive: str) -> int:
    """Occurrences of `primitive` in a jaxpr, counting each sub-jaxpr (scan bodies) once."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == primitive
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count(sub, primitive)
    return n


def test_scanned_layers_trace_one_block_whatever_the_depth():
    images = jnp.zeros((1, 32, 32, 3))
    noise = jnp.zeros((1, 16))

    def matmuls(depth, scan):  # traced only: the models are abstract
        m = nnx.eval_shape(
            lambda: models.create(
                "mae_vit_test", depth=depth, decoder_depth=depth, scan_layers=scan
            )
        )
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        loss = lambda p, r: nnx.merge(graphdef, p, r)(images, noise=noise).loss  # noqa: E731
        return _count(jax.make_jaxpr(jax.grad(loss))(params, rest).jaxpr, "dot_general")

    assert matmuls(2, True) == matmuls(6, True)
    assert matmuls(6, False) > matmuls(2, False)


def test_remat_names_and_old_booleans():
    assert models.resolve("mae_vit_test", remat=True).remat == "full"
    assert models.resolve("mae_vit_test", remat=False).remat == "none"
    assert schema.model_block("mae_vit_test", remat=True).remat == "full"
    with pytest.raises(ValueError, match=r"remat 'yes' is not one of \('none', 'full'"):
        models.resolve("mae_vit_test", remat="yes")
    with pytest.raises(ValueError, match="scan_layers must be True or False, got 1"):
        models.resolve("mae_vit_test", scan_layers=1)


@pytest.mark.parametrize("tokens", [50, 197])
def test_padded_attention_equals_unpadded_forward_and_gradients(tokens):
    shape = (2, tokens, 4, 16)
    q, k, v = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
    cot = jax.random.normal(jax.random.key(3), shape)

    def plain(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, implementation="xla") * cot)

    def padded(q, k, v):
        out = vit.padded_attention(q, k, v, multiple=vit.CUDNN_SEQ_MULTIPLE, implementation="xla")
        assert out.shape == shape
        return jnp.sum(out * cot)

    want = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.value_and_grad(padded, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_automatic_attention_is_xla_off_gpu():
    # On a CPU `attention_impl=None` must not touch cuDNN: the result is XLA's exactly.
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 10, 2, 8)) for i in range(3))
    np.testing.assert_array_equal(
        vit.attention(q, k, v, None), jax.nn.dot_product_attention(q, k, v, implementation="xla")
    )


@pytest.mark.slow  # the paper's widths compile 7-20 s each
@pytest.mark.parametrize("name", sorted(OFFICIAL_TRAINABLE))
def test_paper_presets_forward_under_jit_in_bf16(name):
    """At full depth abstractly (dtypes and shapes; the real ViT-H takes 2.6 GB of parameters
    alone), then for real with each preset's widths, heads, patch and image size on 2 encoder
    blocks and 1 decoder block: finite bf16 compute, fp32 storage and outputs."""
    full = nnx.eval_shape(lambda: models.create(name, dtype="bfloat16", norm_pix_loss=True))
    m = models.create(name, dtype="bfloat16", norm_pix_loss=True, depth=2, decoder_depth=1)
    cfg = m.config
    size, n = cfg.img_size, cfg.num_patches
    images = jax.random.normal(jax.random.key(0), (1, size, size, 3))
    noise = jax.random.uniform(jax.random.key(1), (1, n))
    for model in (full, m):
        assert model.blocks[0].attn.qkv.kernel.get_value().dtype == jnp.float32  # fp32 storage
        graphdef, state = nnx.split(model)

        def forward(state, images, noise, graphdef=graphdef):
            out = nnx.merge(graphdef, state)(images, noise=noise)
            return out.loss, out.pred

        run = jax.eval_shape if model is full else lambda f, *a: jax.jit(f)(*a)
        loss, pred = run(forward, state, images, noise)
        assert loss.shape == () and pred.dtype == jnp.float32
        assert pred.shape == (1, n, cfg.patch_dim)
    assert np.isfinite(float(loss)) and 0.1 < float(loss) < 10


@pytest.mark.parametrize(
    "bad,match",
    [
        (jnp.zeros((2, 30, 30, 3)), "not divisible by the patch size 8"),
        (jnp.zeros((2, 32, 32, 1)), "1 channels"),
        (jnp.zeros((2, 32, 40, 3)), "non-square"),
        (jnp.zeros((2, 64, 64, 3)), "built for 32x32"),
        (jnp.zeros((2, 3, 32, 32)), "channels"),
        (jnp.zeros((32, 32, 3)), "NHWC"),
    ],
)
def test_bad_images_raise_value_error(bad, match):
    m = models.create("mae_vit_test")
    with pytest.raises(ValueError, match=match):
        m(bad)


def test_bad_mask_ratio_and_noise():
    m = models.create("mae_vit_test")
    x = jnp.zeros((2, 32, 32, 3))
    for ratio in (1.0, -0.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            m(x, mask_ratio=ratio)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 15\)"):
        m(x, noise=jnp.zeros((2, 15)))


def test_bad_configs_and_names():
    with pytest.raises(ValueError, match="unknown model preset 'mae_vit_gigantic'"):
        models.create("mae_vit_gigantic")
    with pytest.raises(ValueError, match="img_size 30 is not divisible by patch_size 8"):
        models.create("mae_vit_test", img_size=30)
    with pytest.raises(ValueError, match="mask_ratio"):
        models.create("mae_vit_test", mask_ratio=1.0)
    with pytest.raises(ValueError, match="unknown model option"):
        models.create("mae_vit_test", depthh=3)
    with pytest.raises(ValueError, match="attention_impl"):
        models.create("mae_vit_test", attention_impl="flash")
    cfg = models.resolve({"name": "mae_vit_test", "depth": 3})
    assert cfg.depth == 3 and cfg.embed_dim == 32


@pytest.mark.parametrize(
    "dtype,param_dtype,expected",
    [
        (jnp.bfloat16, np.float32, ("bfloat16", "float32")),
        (np.dtype("float32"), jnp.dtype("bfloat16"), ("float32", "bfloat16")),
        (jnp.float16, "float32", ("float16", "float32")),
        ("bfloat16", "float32", ("bfloat16", "float32")),
    ],
)
def test_dtypes_accept_jax_and_numpy_dtypes(dtype, param_dtype, expected):
    # abstract: the dtypes of the parameters without initializing them (bfloat16 ones compile)
    m = nnx.eval_shape(lambda: models.create("mae_vit_test", dtype=dtype, param_dtype=param_dtype))
    assert (m.config.dtype, m.config.param_dtype) == expected  # names: JSON-serializable
    json.dumps(dataclasses.asdict(m.config))
    assert m.blocks[0].attn.qkv.kernel.get_value().dtype == jnp.dtype(expected[1])
    assert models.MAEConfig(dtype=dtype).dtype == expected[0]
    block = schema.model_block("mae_vit_test", dtype=dtype, param_dtype=param_dtype)
    assert (block.dtype, block.param_dtype) == expected
    for bad in (jnp.float64, np.int32, "bf16"):
        with pytest.raises(ValueError, match="dtype .* is not one of"):
            models.create("mae_vit_test", dtype=bad)


def test_resolve_ignores_none_fields():
    preset = models.PRESETS["mae_vit_base_patch16"]
    fields = {f.name: None for f in dataclasses.fields(models.MAEConfig)}
    assert models.resolve({**fields, "name": "mae_vit_base_patch16"}) == preset
    # keyword overrides stay literal: attention_impl=None resets a trained config's choice
    cudnn = models.resolve("mae_vit_test", attention_impl="cudnn")
    assert models.resolve(cudnn, attention_impl=None).attention_impl is None
    assert models.resolve({"name": "mae_vit_test", "depth": 3, "embed_dim": None}).depth == 3


def test_model_block_has_every_field_typed():
    block = schema.model_block("mae_vit_test", norm_pix_loss=True, dtype=jnp.bfloat16)
    assert set(block.keys()) == {f.name for f in dataclasses.fields(models.MAEConfig)}
    assert block.name == "mae_vit_test" and block.norm_pix_loss is True
    assert block.dtype == "bfloat16" and block.embed_dim is None and block.remat is None
    assert models.resolve(block) == models.resolve(
        "mae_vit_test", norm_pix_loss=True, dtype="bfloat16"
    )
    block.embed_dim, block.num_heads, block.mlp_ratio = 64, 8, 2  # the placeholders' types
    cfg = models.resolve(block)
    assert (cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.depth) == (64, 8, 2.0, 2)
    with pytest.raises(TypeError):
        block.depth = "deep"
    with pytest.raises(ValueError, match="'embed_dm' \\(did you mean 'embed_dim'\\?\\)"):
        schema.model_block("mae_vit_test", embed_dm=64)
    with pytest.raises(ValueError, match="dtype 'bf16' is not one of"):
        schema.model_block("mae_vit_test", dtype="bf16")


def test_bad_architecture_messages_name_field_and_value():
    with pytest.raises(ValueError, match=r"embed_dim 32 .* heads \(num_heads 5\)"):
        models.resolve("mae_vit_test", num_heads=5)
    with pytest.raises(ValueError, match=r"decoder_embed_dim 32 .* \(decoder_num_heads 3\)"):
        models.resolve("mae_vit_test", decoder_num_heads=3)
    with pytest.raises(ValueError, match="depth must be a positive integer, got 0"):
        models.resolve("mae_vit_test", depth=0)
    with pytest.raises(ValueError, match="mlp_ratio must be a number > 0, got 0"):
        models.resolve("mae_vit_test", mlp_ratio=0.0)
    with pytest.raises(ValueError, match="remat 'yes' is not one of"):
        models.resolve("mae_vit_test", remat="yes")
