"""PyTorch interop without torch: names, layouts, shapes, validation, position tables, CLI.

Tests that need torch / transformers / timm live in test_convert_torch.py and
test_convert_timm.py.
"""

import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mae_jax import convert, ops
from mae_jax import workdir as wdir
from mae_jax.convert import cli, posembed
from mae_jax.models import create, resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model with a 6x6 grid, 3 encoder and 2 decoder blocks, encoder != decoder width.
BIGGER = dict(
    name="mae_vit_test",
    img_size=48,
    patch_size=8,
    embed_dim=64,
    depth=3,
    num_heads=4,
    decoder_embed_dim=48,
    decoder_depth=2,
    decoder_num_heads=4,
)


def randomized(name_or_config, seed=0, **overrides):
    """A model whose every parameter (biases and norms included) is random."""
    model = create(name_or_config, seed=seed, **overrides)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree.flatten(pure)
    rng = np.random.default_rng(seed + 100)  # numpy: no compilation per shape
    new = [jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, new))
    nnx.update(model, state)
    return model


def randomized_classifier(name_or_config, num_classes=7, seed=0, **kw):
    """A `ViTClassifier` (`kw`: global_pool, linear_probe) whose every parameter and BatchNorm
    statistic is random (variances positive)."""
    from mae_jax.models.classifier import create_classifier

    model = create_classifier(name_or_config, num_classes, seed=seed, **kw)
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    flat_state = nnx.to_flat_state(state)
    rng = np.random.default_rng(seed + 200)
    for path, var in flat_state:
        x = var.get_value()
        value = 0.2 * rng.standard_normal(x.shape)
        if path[-1] == "var":
            value = np.abs(value) + 0.5
        var.set_value(jnp.asarray(value, x.dtype))
    nnx.update(model, nnx.from_flat_state(flat_state))
    return model


def params_of(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def flat(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def assert_same_params(a, b, *, skip_prefix=None):
    fa, fb = flat(params_of(a)), flat(params_of(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        if skip_prefix and any(k.startswith(f"['{s}") for s in skip_prefix):
            continue
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


DECODER = ("decoder_", "mask_token")


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", convert.FORMATS)
@pytest.mark.parametrize("config", ["mae_vit_test", BIGGER], ids=["test", "bigger"])
def test_export_import_gives_identical_parameters(fmt, config):
    model = randomized(config, seed=1)
    sd = convert.to_pytorch(model, fmt)
    assert all(v.dtype == np.float32 for v in sd.values())
    if fmt == "timm":
        with pytest.warns(UserWarning, match="encoder only"):
            back = convert.from_pytorch(sd, config, seed=7)
        assert_same_params(model, back, skip_prefix=DECODER)
        fresh = create(config, seed=7)  # the decoder comes from the seed
        fb, ff = flat(params_of(back)), flat(params_of(fresh))
        for k in fb:
            if any(k.startswith(f"['{s}") for s in DECODER):
                np.testing.assert_array_equal(fb[k], ff[k], err_msg=k)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = convert.from_pytorch(sd, config, seed=7)
        assert_same_params(model, back)
        np.testing.assert_array_equal(
            np.asarray(back.decoder_pos_embed.get_value()),
            np.asarray(model.decoder_pos_embed.get_value()),
        )
    np.testing.assert_array_equal(
        np.asarray(back.pos_embed.get_value()), np.asarray(model.pos_embed.get_value())
    )


def test_round_trip_keeps_bfloat16_storage_and_exports_float32():
    model = randomized("mae_vit_test", seed=2, param_dtype="bfloat16")
    sd = convert.to_pytorch(model, "official")
    assert sd["blocks.0.attn.qkv.weight"].dtype == np.float32
    back = convert.from_pytorch(sd, model.config)
    assert back.cls_token.get_value().dtype == jnp.bfloat16
    assert_same_params(model, back)


# ----------------------------------------------------------------------------- key sets
def reference_keys(depth, decoder_depth):
    """The official MaskedAutoencoderViT key set (facebookresearch/mae, models_mae.py)."""

    def block(prefix):
        return [
            f"{prefix}.{m}.{leaf}"
            for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
            for leaf in ("weight", "bias")
        ]

    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        keys += block(f"blocks.{i}")
    keys += [
        "norm.weight",
        "norm.bias",
        "mask_token",
        "decoder_pos_embed",
        "decoder_embed.weight",
        "decoder_embed.bias",
    ]
    for i in range(decoder_depth):
        keys += block(f"decoder_blocks.{i}")
    keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return keys


PAPER = [  # name, D, depth, patch, entries, numbers, encoder numbers (official models_mae.py state dicts)
    ("mae_vit_base_patch16", 768, 12, 16, 254, 111_907_840, 85_798_656),
    ("mae_vit_large_patch16", 1024, 24, 16, 398, 329_541_888, 303_301_632),
    ("mae_vit_huge_patch14", 1280, 32, 14, 494, 657_074_508, 630_764_800),
]


@pytest.mark.parametrize(
    "name,dim,depth,patch,entries,numbers,enc_numbers", PAPER, ids=[p[0] for p in PAPER]
)
def test_official_export_has_the_reference_keys_and_shapes(
    name, dim, depth, patch, entries, numbers, enc_numbers
):
    config = resolve(name)
    shapes = convert.pytorch_shapes(config, "official")
    ref = reference_keys(depth, 8)
    assert set(shapes) == set(ref)
    assert len(shapes) == entries
    assert sum(int(np.prod(s)) for s in shapes.values()) == numbers
    tokens = 1 + (224 // patch) ** 2
    expect = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, tokens, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "blocks.0.attn.qkv.weight": (3 * dim, dim),
        "blocks.0.attn.qkv.bias": (3 * dim,),
        "blocks.0.attn.proj.weight": (dim, dim),
        "blocks.0.mlp.fc1.weight": (4 * dim, dim),
        "blocks.0.mlp.fc2.weight": (dim, 4 * dim),
        "norm.weight": (dim,),
        "mask_token": (1, 1, 512),
        "decoder_pos_embed": (1, tokens, 512),
        "decoder_embed.weight": (512, dim),
        "decoder_blocks.7.attn.qkv.weight": (1536, 512),
        "decoder_pred.weight": (patch * patch * 3, 512),
    }
    for key, shape in expect.items():
        assert shapes[key] == shape, key
    timm = convert.pytorch_shapes(config, "timm")
    assert set(timm) == {k for k in ref if not k.startswith(DECODER)}
    assert sum(int(np.prod(s)) for s in timm.values()) == enc_numbers


def test_export_matches_pytorch_shapes_and_hf_splits_qkv():
    model = randomized(BIGGER, seed=3)
    for fmt in convert.FORMATS:
        sd = convert.to_pytorch(model, fmt)
        assert {k: v.shape for k, v in sd.items()} == convert.pytorch_shapes(model.config, fmt)
    hf = convert.to_pytorch(model, "hf")
    off = convert.to_pytorch(model, "official")
    d = BIGGER["embed_dim"]
    for i, part in enumerate(("query", "key", "value")):
        pre = f"vit.encoder.layer.2.attention.attention.{part}"
        np.testing.assert_array_equal(
            hf[f"{pre}.weight"], off["blocks.2.attn.qkv.weight"][i * d : (i + 1) * d]
        )
        np.testing.assert_array_equal(
            hf[f"{pre}.bias"], off["blocks.2.attn.qkv.bias"][i * d : (i + 1) * d]
        )
    pairs = {
        "vit.encoder.layer.0.attention.output.dense.weight": "blocks.0.attn.proj.weight",
        "vit.encoder.layer.0.intermediate.dense.weight": "blocks.0.mlp.fc1.weight",
        "vit.encoder.layer.0.output.dense.bias": "blocks.0.mlp.fc2.bias",
        "vit.encoder.layer.1.layernorm_before.weight": "blocks.1.norm1.weight",
        "vit.encoder.layer.1.layernorm_after.bias": "blocks.1.norm2.bias",
        "vit.layernorm.weight": "norm.weight",
        "vit.embeddings.position_embeddings": "pos_embed",
        "decoder.decoder_layers.1.attention.output.dense.weight": "decoder_blocks.1.attn.proj.weight",
        "decoder.decoder_pred.weight": "decoder_pred.weight",
        "decoder.decoder_pos_embed": "decoder_pos_embed",
        "decoder.mask_token": "mask_token",
    }
    for hk, ok in pairs.items():
        np.testing.assert_array_equal(hf[hk], off[ok], err_msg=hk)


def test_official_layouts_compute_what_pytorch_modules_compute():
    """Conv2d weight [D, C, p, p] on an NHWC image and Linear weight [out, in] give our
    patch embedding and linear layers (PyTorch's definitions, written in numpy)."""
    model = randomized(BIGGER, seed=4)
    sd = convert.to_pytorch(model, "official")
    p = BIGGER["patch_size"]
    x = np.random.default_rng(0).standard_normal((2, 48, 48, 3)).astype(np.float32)
    w, b = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
    g = 48 // p
    conv = np.zeros((2, g, g, w.shape[0]), np.float64)
    for i in range(g):
        for j in range(g):
            window = x[:, i * p : (i + 1) * p, j * p : (j + 1) * p, :]  # N, u, v, c
            conv[:, i, j] = np.einsum("nuvc,dcuv->nd", window, w) + b
    ours = np.asarray(model.patch_embed(ops.patchify(jnp.asarray(x), p)))
    np.testing.assert_allclose(ours, conv.reshape(2, g * g, -1), rtol=1e-4, atol=1e-4)
    h = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    fc1 = h @ sd["blocks.1.mlp.fc1.weight"].T + sd["blocks.1.mlp.fc1.bias"]
    np.testing.assert_allclose(
        np.asarray(model.blocks[1].mlp.fc1(jnp.asarray(h))), fc1, rtol=1e-4, atol=1e-4
    )


# ----------------------------------------------------------------------------- validation
def test_mismatched_state_dict_lists_missing_unexpected_and_misshaped_keys():
    sd = convert.to_pytorch(randomized("mae_vit_test"), "official")
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.9.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    sd["decoder_pred.weight"] = sd["decoder_pred.weight"][:, :5]
    with pytest.raises(ValueError) as err:
        convert.from_pytorch(sd, "mae_vit_test")
    msg = str(err.value)
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): blocks.9.attn.qkv.weight" in msg
    assert "mis-shaped keys (1): decoder_pred.weight: file (192, 5), expected (192, 32)" in msg


def test_file_of_another_model_fails_with_lists():
    sd = convert.to_pytorch(randomized("mae_vit_test"), "hf")
    with pytest.raises(ValueError) as err:
        convert.from_pytorch(sd, BIGGER)
    msg = str(err.value)
    assert "missing keys (32): " in msg  # BIGGER has one more encoder and decoder block
    assert "vit.encoder.layer.2.attention.attention.query.weight" in msg
    assert "mis-shaped keys" in msg and "vit.embeddings.cls_token: file (1, 1, 32)" in msg


def test_partial_decoder_is_an_error_and_unexpected_keys_can_be_dropped():
    sd = convert.to_pytorch(randomized("mae_vit_test"), "official")
    partial = {k: v for k, v in sd.items() if not k.startswith("decoder_blocks")}
    with pytest.raises(ValueError, match="missing keys .*decoder_blocks.0.attn.proj.bias"):
        convert.from_pytorch(partial, "mae_vit_test")
    with_head = dict(
        sd,
        **{"head.weight": np.zeros((10, 32), np.float32), "head.bias": np.zeros((10,), np.float32)},
    )
    with pytest.raises(ValueError, match="unexpected keys \\(2\\): head.weight, head.bias"):
        convert.from_pytorch(with_head, "mae_vit_test")
    with pytest.warns(UserWarning, match="ignoring 2 unexpected key"):
        model = convert.from_pytorch(with_head, "mae_vit_test", strict=False)
    np.testing.assert_array_equal(convert.to_pytorch(model)["norm.weight"], sd["norm.weight"])


def test_encoder_only_official_file_warns_and_keeps_the_encoder():
    model = randomized("mae_vit_test", seed=5)
    sd = {
        k: v for k, v in convert.to_pytorch(model, "official").items() if not k.startswith(DECODER)
    }
    wrapped = {"model": sd}  # the published files' wrapper
    with pytest.warns(UserWarning, match="encoder only.*decoder of mae_vit_test is freshly"):
        back = convert.from_pytorch(wrapped, "mae_vit_test", seed=3)
    assert_same_params(model, back, skip_prefix=DECODER)


def test_detect_format_wrappers_and_prefixes():
    model = randomized("mae_vit_test")
    off = convert.to_pytorch(model, "official")
    assert convert.detect_format(off) == "official"
    assert (
        convert.detect_format({k: v for k, v in off.items() if not k.startswith(DECODER)}) == "timm"
    )
    assert convert.detect_format(convert.to_pytorch(model, "hf")) == "hf"
    with pytest.raises(ValueError, match="unrecognized state dict.*found: a, b"):
        convert.detect_format({"a": 1, "b": 2})
    ddp = {"model": {f"module.{k}": v for k, v in off.items()}, "epoch": 3}
    assert_same_params(model, convert.from_pytorch(ddp, "mae_vit_test"))
    with pytest.raises(ValueError, match="'epoch' is a int, not a tensor"):
        convert.from_pytorch({**off, "epoch": 3}, "mae_vit_test")


def _rename_to_transformers5(key):
    """transformers 5's in-memory names (its conversion mapping), written independently."""
    for old, new in (
        ("vit.encoder.layer.", "vit.layers."),
        ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ):
        key = key.replace(old, new)
    return key


def test_hf_newer_and_model_only_namings_are_accepted():
    model = randomized("mae_vit_test", seed=6)
    hf = convert.to_pytorch(model, "hf")
    renamed = {_rename_to_transformers5(k): v for k, v in hf.items()}
    assert "vit.layers.0.attention.q_proj.weight" in renamed
    assert "decoder.decoder_layers.0.mlp.fc2.bias" in renamed
    assert_same_params(model, convert.from_pytorch(renamed, "mae_vit_test"))
    saved = {
        k.replace("decoder.decoder_layers.", "decoder.decoder_encoder.layer."): v
        for k, v in hf.items()
    }  # what transformers 5's save_pretrained writes
    assert_same_params(model, convert.from_pytorch(saved, "mae_vit_test"))
    encoder_model = {k[len("vit.") :]: v for k, v in hf.items() if k.startswith("vit.")}
    with pytest.warns(UserWarning, match="encoder only"):
        back = convert.from_pytorch(encoder_model, "mae_vit_test")  # ViTMAEModel keys
    assert_same_params(model, back, skip_prefix=DECODER)


def test_hf_config_fields_and_architecture_check():
    config = resolve(BIGGER, norm_pix_loss=True)
    cfg = convert.hf_config(config, img_size=64)
    assert cfg["model_type"] == "vit_mae" and cfg["architectures"] == ["ViTMAEForPreTraining"]
    assert (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["intermediate_size"],
    ) == (64, 3, 4, 256)
    assert (
        cfg["decoder_hidden_size"],
        cfg["decoder_num_hidden_layers"],
        cfg["decoder_num_attention_heads"],
        cfg["decoder_intermediate_size"],
    ) == (48, 2, 4, 192)
    assert (cfg["image_size"], cfg["patch_size"], cfg["num_channels"]) == (64, 8, 3)
    assert cfg["norm_pix_loss"] is True and cfg["mask_ratio"] == 0.75
    assert (cfg["layer_norm_eps"], cfg["hidden_act"], cfg["qkv_bias"]) == (1e-6, "gelu", True)
    assert convert.check_hf_config(cfg, config) == []
    with pytest.raises(ValueError, match="num_attention_heads=8 \\(model: 4\\)"):
        convert.check_hf_config(dict(cfg, num_attention_heads=8), config)
    notes = convert.check_hf_config(dict(cfg, layer_norm_eps=1e-12), config)
    assert notes and "layer_norm_eps=1e-12" in notes[0]


# ----------------------------------------------------------------------------- position tables
def test_bicubic_matrix_properties():
    for n_in, n_out in ((4, 7), (14, 16), (16, 14), (5, 5)):
        m = posembed.bicubic_matrix(n_in, n_out)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)  # constants preserved
    np.testing.assert_allclose(posembed.bicubic_matrix(6, 6), np.eye(6), atol=1e-12)
    # Upsampling 2x: output 1 sits at source 0.25 between taps -1..2 (clamped at 0).
    a = -0.75
    t = 0.25
    w = [
        ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x > 1 else ((a + 2) * x - (a + 3)) * x * x + 1
        for x in (1 + t, t, 1 - t, 2 - t)
    ]
    np.testing.assert_allclose(posembed.bicubic_matrix(4, 8)[1], [w[0] + w[1], w[2], w[3], 0])


def test_interpolate_pos_embed_keeps_cls_and_resizes_patch_rows():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1, 1 + 16, 8)).astype(np.float32)
    out = convert.interpolate_pos_embed(table, 6)
    assert out.shape == (1, 37, 8)
    np.testing.assert_array_equal(out[0, 0], table[0, 0])
    np.testing.assert_array_equal(convert.interpolate_pos_embed(table, 4), table)
    const = np.ones((1, 17, 8), np.float32)
    np.testing.assert_allclose(convert.interpolate_pos_embed(const, 7), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="square patch grid"):
        convert.interpolate_pos_embed(np.zeros((1, 1 + 15, 8), np.float32), 4)


def test_sincos_tables_are_regenerated_on_another_grid():
    model = randomized("mae_vit_test", seed=8)  # 32 px, grid 4
    sd = convert.to_pytorch(model, "official", img_size=64)  # grid 8
    np.testing.assert_array_equal(sd["pos_embed"][0], ops.sincos_2d(32, 8))
    np.testing.assert_array_equal(sd["decoder_pos_embed"][0], ops.sincos_2d(32, 8))
    back = convert.from_pytorch(sd, "mae_vit_test")  # grid 8 file into the grid-4 model
    np.testing.assert_array_equal(np.asarray(back.pos_embed.get_value())[0], ops.sincos_2d(32, 4))
    assert_same_params(model, back)
    with pytest.raises(ValueError, match="positive multiple of the patch size 8"):
        convert.to_pytorch(model, "official", img_size=60)


def test_learned_tables_are_interpolated_bicubically():
    model = randomized("mae_vit_test", seed=9)
    sd = convert.to_pytorch(model, "timm")
    rng = np.random.default_rng(1)
    learned = (0.02 * rng.standard_normal((1, 17, 32))).astype(np.float32)
    sd["pos_embed"] = learned
    with pytest.warns(UserWarning, match="encoder only"):
        big = convert.from_pytorch(sd, resolve("mae_vit_test", img_size=48))  # grid 6
    got = np.asarray(big.pos_embed.get_value())
    np.testing.assert_array_equal(got, convert.interpolate_pos_embed(learned, 6))
    # and an export at another size interpolates the model's (non sin-cos) table back
    small = convert.to_pytorch(big, "timm", img_size=32)["pos_embed"]
    np.testing.assert_array_equal(small, convert.interpolate_pos_embed(got, 4))
    with pytest.raises(ValueError, match="pos_embed: file \\(1, 16, 32\\)"):
        convert.from_pytorch(dict(sd, pos_embed=learned[:, 1:]), "mae_vit_test")


# ----------------------------------------------------------------------------- no torch
@pytest.mark.slow
def test_convert_works_without_torch(tmp_path):
    pytest.importorskip("safetensors")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any 'import torch' now raises ImportError
        from mae_jax import convert
        from mae_jax.models import create
        model = create("mae_vit_test")
        sd = convert.to_pytorch(model, "hf")
        convert.save(sd, r"{tmp_path}/hf", "hf", model.config)
        back = convert.from_pytorch(r"{tmp_path}/hf", "mae_vit_test")
        try:
            convert.save(convert.to_pytorch(model), r"{tmp_path}/x.pth", "official",
                         model.config)
        except ImportError as e:
            print("IMPORT-ERROR", e)
        print("OK", len(sd), "torch" in sys.modules and sys.modules["torch"] is not None)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK 62 False" in res.stdout
    assert "IMPORT-ERROR writing" in res.stdout and "needs the 'torch' package" in res.stdout


# ----------------------------------------------------------------------------- CLI
def _save_run(workdir, steps_models):
    """A pretraining-like workdir: checkpoints/<step> with params, an optimizer state and
    the model config in meta (the trainer's contract)."""
    with wdir.Writer(workdir, keep=None, async_save=False, handle_sigterm=False) as ck:
        for step, model in steps_models:
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            opt_state = {"mu": jax.tree.map(jnp.zeros_like, params), "count": jnp.asarray(step)}
            ck.save(
                step,
                {"params": params, "opt_state": opt_state, "step": step},
                {"model": dataclasses.asdict(model.config), "epoch": 1},
            )
            ck.wait()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    pytest.importorskip("safetensors")
    path = str(tmp_path_factory.mktemp("run"))
    early, late = randomized(BIGGER, seed=11), randomized(BIGGER, seed=12)
    _save_run(path, [(3, early), (7, late)])
    return path, early, late


def _load(path):
    from safetensors.numpy import load_file

    return load_file(path)


def test_cli_export_latest_and_given_step(workdir, tmp_path, capsys):
    path, early, late = workdir
    out = str(tmp_path / "enc.safetensors")
    assert cli.main(["export", "--workdir", path, "--format", "timm", "--output", out]) == 0
    assert "wrote" in capsys.readouterr().out
    got, want = _load(out), convert.to_pytorch(late, "timm")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    out3 = str(tmp_path / "enc3.safetensors")
    assert (
        cli.main(
            [
                "export",
                "--workdir",
                path,
                "--step",
                "3",
                "--format",
                "timm",
                "--output",
                out3,
                "--img-size",
                "64",
            ]
        )
        == 0
    )
    got3 = _load(out3)
    np.testing.assert_array_equal(
        got3["blocks.2.attn.qkv.weight"],
        convert.to_pytorch(early, "timm")["blocks.2.attn.qkv.weight"],
    )
    assert got3["pos_embed"].shape == (1, 65, 64)


def test_cli_import_export_round_trip_through_checkpoints(workdir, tmp_path, capsys):
    path, _, late = workdir
    hf_dir = str(tmp_path / "hf")
    assert cli.main(["export", "--workdir", path, "--format", "hf", "--output", hf_dir]) == 0
    assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors"]
    new = str(tmp_path / "imported")
    args = ["import", "--input", hf_dir, "--model", "mae_vit_test", "--workdir", new]
    for key in ("img_size", "embed_dim", "depth", "decoder_embed_dim", "decoder_depth"):
        args += ["--set", f"{key}={BIGGER[key]}"]
    assert cli.main(args) == 0
    assert "weights from" in capsys.readouterr().out
    reader = wdir.Reader(new)
    assert reader.steps() == [0]
    meta = reader.meta(0)
    assert meta["kind"] == "weights" and meta["source"] == hf_dir
    assert meta["model"] == dataclasses.asdict(late.config)
    params = wdir.read_mae(new, 0)[2]
    fa, fb = flat(params), flat(params_of(late))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    # Exported again, the imported checkpoint gives the very same file contents.
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert cli.main(["export", "--workdir", path, "--format", "timm", "--output", a]) == 0
    assert cli.main(["export", "--workdir", new, "--format", "timm", "--output", b]) == 0
    ga, gb = _load(a), _load(b)
    assert ga.keys() == gb.keys() and all(np.array_equal(ga[k], gb[k]) for k in ga)


def test_cli_errors(workdir, tmp_path, capsys):
    path, _, _ = workdir
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    assert cli.main(["export", "--workdir", path, "--format", "timm", "--output", str(out)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert (
        cli.main(["export", "--workdir", path, "--format", "timm", "--output", str(out), "--force"])
        == 0
    )
    assert set(_load(str(out))) == set(convert.pytorch_shapes(resolve(BIGGER), "timm"))
    assert (
        cli.main(
            [
                "export",
                "--workdir",
                str(tmp_path / "nope"),
                "--format",
                "timm",
                "--output",
                str(tmp_path / "y.safetensors"),
            ]
        )
        == 1
    )
    assert "nope does not exist" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "export",
                "--workdir",
                path,
                "--step",
                "5",
                "--format",
                "timm",
                "--output",
                str(tmp_path / "y.safetensors"),
            ]
        )
        == 1
    )
    assert "no checkpoint 5 in" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "export",
                "--workdir",
                path,
                "--format",
                "official",
                "--output",
                str(tmp_path / "y.npz"),
            ]
        )
        == 1
    )
    assert "must be a .pth file" in capsys.readouterr().err
    assert (
        cli.main(["import", "--input", str(out), "--model", "mae_vit_test", "--workdir", path]) == 1
    )
    assert "already holds checkpoints (steps [3, 7])" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "import",
                "--input",
                str(out),
                "--model",
                "mae_vit_test",
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 1
    )
    assert "mis-shaped keys" in capsys.readouterr().err  # BIGGER's file, mae_vit_test model
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
    assert (
        cli.main(
            [
                "import",
                "--input",
                str(tmp_path / "missing.pth"),
                "--model",
                "mae_vit_test",
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 1
    )
    assert "does not exist" in capsys.readouterr().err


def test_cli_usage_errors(tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    export = ["export", "--workdir", str(tmp_path), "--output", out]
    for argv, message in [
        ([], "expected one subcommand, export or import; got none"),
        (["convert", "--workdir", "w"], "expected one subcommand, export or import; got 'convert'"),
        (["export", "import"], "expected one subcommand"),
        (["export", "--workdir", "w"], "export needs --format, --output"),
        (["import", "--input", "a.pth", "--model", "m"], "import needs --workdir"),
        ([*export, "--format", "timm", "--seed", "3"], "--seed is not an option of export"),
        ([*export, "--format", "pdf"], "flag --format=pdf: value should be one of"),
        ([*export, "--format", "timm", "--step", "last"], "flag --step=last: invalid literal"),
        ([*export, "--format", "timm", "--out", "y"], "Unknown command line flag 'out'"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_cli_module_entry_point(workdir, tmp_path):
    path, _, late = workdir
    out = str(tmp_path / "m.safetensors")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)

    def export():
        command = ["-m", "mae_jax.convert", "export", "--workdir", path, "--format", "timm"]
        return subprocess.run(
            [sys.executable, *command, "--output", out],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=300,
        )

    res = export()
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_array_equal(
        _load(out)["norm.bias"], convert.to_pytorch(late, "timm")["norm.bias"]
    )
    res = export()  # the output exists now
    assert res.returncode == 1 and "error:" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "mae_jax.convert", "export", "--workdir", path, "--output", out],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 2 and res.stderr == "error: export needs --format\n", res.stderr
