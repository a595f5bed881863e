"""PyTorch interop against real torch and Hugging Face transformers.

Needs torch, safetensors and transformers (skipped otherwise). Hugging Face's
`ViTMAEForPreTraining` is an independent implementation of MAE: loaded from our export and given
the same images and `noise`, it must return our loss, predictions and mask.
"""

import argparse
import dataclasses
import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from test_convert import (  # noqa: E402
    BIGGER,
    DECODER,
    _save_run,
    assert_same_params,
    flat,  # noqa: E402
    params_of,
    randomized,
    randomized_classifier,
)

from mae_jax import convert  # noqa: E402
from mae_jax import workdir as wdir  # noqa: E402
from mae_jax.convert import classifier as cc  # noqa: E402
from mae_jax.convert import cli, mapping  # noqa: E402
from mae_jax.models import resolve  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# ----------------------------------------------------------------------------- .pth files
def test_official_pth_is_a_model_wrapped_float32_state_dict(tmp_path):
    model = randomized("mae_vit_test", seed=1)
    sd = convert.to_pytorch(model, "official")
    path = str(tmp_path / "mae.pth")
    convert.save(sd, path, "official", model.config)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert list(raw) == ["model"]
    assert list(raw["model"]) == list(sd)
    assert all(t.dtype == torch.float32 for t in raw["model"].values())
    np.testing.assert_array_equal(
        raw["model"]["blocks.1.attn.qkv.weight"].numpy(), sd["blocks.1.attn.qkv.weight"]
    )
    assert_same_params(model, convert.from_pytorch(path, "mae_vit_test"))
    with pytest.raises(FileExistsError, match="already exists"):
        convert.save(sd, path, "official", model.config)


class _Evil:
    """Unpickling this would create a file: the loader must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pth_with_arbitrary_objects_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    sd = convert.to_pytorch(randomized("mae_vit_test"), "official")
    path = str(tmp_path / "evil.pth")
    torch.save(
        {"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "payload": _Evil(marker)}, path
    )
    with pytest.raises(ValueError, match="weights_only=True"):
        convert.from_pytorch(path, "mae_vit_test")
    assert not os.path.exists(marker)
    plain = str(tmp_path / "plain.pth")  # a pickle that is not a torch zip archive
    with open(plain, "wb") as f:
        pickle.dump(_Evil(marker), f)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert.from_pytorch(plain, "mae_vit_test")
    assert not os.path.exists(marker)


def test_official_training_checkpoint_layout_loads(tmp_path):
    """The official trainer saves model, optimizer, epoch, scaler and an argparse Namespace."""
    model = randomized("mae_vit_test", seed=2)
    sd = {k: torch.from_numpy(v) for k, v in convert.to_pytorch(model, "official").items()}
    path = str(tmp_path / "checkpoint-799.pth")
    torch.save(
        {
            "model": sd,
            "optimizer": {
                "state": {0: {"exp_avg": torch.zeros(3)}},
                "param_groups": [{"lr": 1e-3, "params": [0]}],
            },
            "epoch": 799,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True),
        },
        path,
    )
    assert_same_params(model, convert.from_pytorch(path, "mae_vit_test"))


def test_half_precision_tensors_are_widened(tmp_path):
    model = randomized("mae_vit_test", seed=3)
    sd = {
        k: torch.from_numpy(v).to(torch.bfloat16)
        for k, v in convert.to_pytorch(model, "official").items()
    }
    back = convert.from_pytorch(sd, "mae_vit_test")
    want = sd["blocks.0.mlp.fc1.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(back.blocks[0].mlp.fc1.kernel.get_value()), want)


# ----------------------------------------------------------------------------- classifiers
def _same_tree(a, b):
    fa, fb = flat(cc.classifier_tree(a)), flat(cc.classifier_tree(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(global_pool=False), dict(global_pool=False, linear_probe=True)],
    ids=["finetuned_gap", "finetuned_cls", "probe_cls"],
)
def test_official_classifier_pth_round_trip_is_exact(kw, tmp_path):
    """Our classifier -> the official fine-tuning / linear-probing `.pth` -> back: every
    parameter, statistic and the position table identical; the keys are the official
    `models_vit` ones (head.0 / head.1 for a linear probe)."""
    model = randomized_classifier(BIGGER, 7, seed=8, **kw)
    sd = cc.classifier_to_pytorch(model, "official")
    path = str(tmp_path / "classifier.pth")
    convert.save(sd, path, "official", model.config)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert list(raw) == ["model"]
    keys = set(raw["model"])
    pooled = kw.get("global_pool", True)
    assert ("fc_norm.weight" in keys) == pooled and ("norm.weight" in keys) != pooled
    if kw.get("linear_probe"):
        assert {"head.0.running_mean", "head.0.running_var", "head.1.weight"} <= keys
        assert raw["model"]["head.0.num_batches_tracked"].dtype == torch.int64
    else:
        assert raw["model"]["head.weight"].shape == (7, BIGGER["embed_dim"])
    back = cc.classifier_from_pytorch(path, resolve(BIGGER))
    assert back.head_spec == model.head_spec
    _same_tree(model, back)
    np.testing.assert_array_equal(back.pos_embed.get_value(), model.pos_embed.get_value())


def test_official_classifier_with_a_trained_position_table_keeps_it(tmp_path):
    """The official fine-tuning trains pos_embed: imported as found, exported back as is."""
    model = randomized_classifier(BIGGER, 5, seed=9)
    sd = cc.classifier_to_pytorch(model, "official")
    sd["pos_embed"] = sd["pos_embed"] + 0.05 * np.random.default_rng(0).standard_normal(
        sd["pos_embed"].shape
    ).astype(np.float32)
    converted = cc.read_classifier(sd, resolve(BIGGER))
    assert not converted.sincos
    back = cc.build_classifier(converted, resolve(BIGGER))
    np.testing.assert_array_equal(
        cc.classifier_to_pytorch(back, "official")["pos_embed"], sd["pos_embed"]
    )


def test_classifier_files_that_do_not_fit_are_refused(tmp_path):
    model = randomized_classifier(BIGGER, 5, seed=1)
    sd = cc.classifier_to_pytorch(model, "official")
    with pytest.raises(ValueError, match="mis-shaped keys.*blocks.0.attn.qkv.weight"):
        cc.read_classifier(sd, "mae_vit_test")  # another width
    with pytest.raises(ValueError, match="no classifier head"):
        cc.read_classifier(
            convert.to_pytorch(randomized("mae_vit_test"), "official"), "mae_vit_test"
        )
    extra = dict(sd, **{"dist_token": np.zeros((1, 1, 64), np.float32)})
    with pytest.raises(ValueError, match="unexpected keys.*dist_token"):
        cc.read_classifier(extra, resolve(BIGGER))


# ----------------------------------------------------------------------------- bicubic
def _official_interpolate(table, new_grid):
    """The official fine-tuning code's pos-embed interpolation, written from the official util/pos_embed.py:
    cls row kept, patch rows as a [1, D, g, g] image, torch bicubic, align_corners=False."""
    t = torch.from_numpy(table)
    extra, pos = t[:, :1], t[:, 1:]
    g = int(round(pos.shape[1] ** 0.5))
    img = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    img = torch.nn.functional.interpolate(
        img, size=(new_grid, new_grid), mode="bicubic", align_corners=False
    )
    return torch.cat([extra, img.permute(0, 2, 3, 1).flatten(1, 2)], dim=1).numpy()


@pytest.mark.parametrize("old,new", [(4, 7), (14, 16), (16, 14), (14, 32), (7, 3)])
def test_bicubic_interpolation_matches_torch(old, new):
    table = np.random.default_rng(old * new).standard_normal((1, 1 + old * old, 24))
    table = table.astype(np.float32)
    ours = convert.interpolate_pos_embed(table, new)
    # torch computes in float32, we in float64: agreement to float32 rounding.
    np.testing.assert_allclose(ours, _official_interpolate(table, new), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")


def _hf_model(directory, cls=None):
    """`cls` (default `ViTMAEForPreTraining`) from our export: every key used, none missing."""
    cls = cls or transformers.ViTMAEForPreTraining
    model, info = cls.from_pretrained(
        directory, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _compare_with_hf(ours, hf, seed):
    c = ours.config
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((3, c.img_size, c.img_size, 3)).astype(np.float32)
    noise = rng.random((3, c.num_patches)).astype(np.float32)
    out = ours(jnp.asarray(images), noise=jnp.asarray(noise))
    with torch.no_grad():
        ref = hf(
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
            noise=torch.from_numpy(noise),
        )
    np.testing.assert_array_equal(np.asarray(out.mask), ref.mask.numpy())
    np.testing.assert_array_equal(np.asarray(out.ids_restore), ref.ids_restore.numpy())
    assert relerr(out.loss, ref.loss.numpy()) < 1e-5, (float(out.loss), ref.loss.item())
    assert relerr(out.pred, ref.logits.numpy()) < 1e-5
    return float(out.loss)


@pytest.mark.parametrize("norm_pix_loss", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("config", ["mae_vit_test", BIGGER], ids=["test", "bigger"])
def test_hf_loaded_from_our_export_gives_our_loss_and_predictions(config, norm_pix_loss, tmp_path):
    ours = randomized(config, seed=4, norm_pix_loss=norm_pix_loss)
    directory = str(tmp_path / "hf")
    convert.save(convert.to_pytorch(ours, "hf"), directory, "hf", ours.config)
    hf = _hf_model(directory)
    assert hf.config.norm_pix_loss is norm_pix_loss
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.hidden_act == "gelu"
    losses = [_compare_with_hf(ours, hf, seed) for seed in (0, 1)]
    assert losses[0] != losses[1]


def test_our_model_from_a_transformers_saved_model_matches_it(tmp_path):
    """The other direction: a randomly initialized HF model, saved by transformers itself."""
    config = resolve(BIGGER, norm_pix_loss=True)
    torch.manual_seed(0)
    hf = transformers.ViTMAEForPreTraining(
        transformers.ViTMAEConfig(**convert.hf_config(config))
    ).eval()
    with torch.no_grad():  # make every tensor non-trivial (HF inits biases to zero)
        for name, p in hf.named_parameters():
            if "pos_embed" not in name and "position_embeddings" not in name:
                p.add_(0.1 * torch.randn_like(p))
    directory = str(tmp_path / "saved")
    hf.save_pretrained(directory)
    ours = convert.from_pytorch(directory, config)
    _compare_with_hf(ours, hf, seed=2)
    in_memory = convert.from_pytorch(hf.state_dict(), config)  # transformers 5 naming
    assert_same_params(ours, in_memory)


@pytest.mark.parametrize(
    "name", ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]
)
def test_hf_export_keys_and_shapes_match_transformers_for_paper_models(name):
    config = resolve(name)
    with torch.device("meta"):
        hf = transformers.ViTMAEForPreTraining(
            transformers.ViTMAEConfig(**convert.hf_config(config))
        )
    theirs = {k: tuple(v.shape) for k, v in mapping.normalize_hf_names(hf.state_dict()).items()}
    assert theirs == convert.pytorch_shapes(config, "hf")


@pytest.mark.parametrize(
    "kw", [dict(global_pool=False), dict(global_pool=False, linear_probe=True)], ids=["ft", "probe"]
)
def test_hf_image_classifier_from_our_export_gives_our_logits(kw, tmp_path):
    """A cls-token classifier (a linear probe with its BatchNorm folded into the head) in
    `ViTForImageClassification`, and back (a HF directory imports as a plain-head classifier
    computing the same logits)."""
    model = randomized_classifier(BIGGER, 7, seed=10, **kw)
    directory = str(tmp_path / "hf")
    convert.save(
        cc.classifier_to_pytorch(model, "hf"),
        directory,
        "hf",
        model.config,
        hf_cfg=cc.hf_classifier_config(model.config, model.head_spec),
    )
    hf = _hf_model(directory, transformers.ViTForImageClassification)
    assert hf.config.num_labels == 7 and hf.config.layer_norm_eps == 1e-6
    images = np.random.default_rng(1).standard_normal((3, 48, 48, 3)).astype(np.float32)
    ours = np.asarray(model(jnp.asarray(images), train=False))
    with torch.no_grad():
        theirs = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).logits
    assert relerr(ours, theirs.numpy()) < 1e-5
    back = cc.classifier_from_pytorch(directory, resolve(BIGGER))
    assert not back.linear_probe and not back.global_pool
    assert relerr(back(jnp.asarray(images), train=False), ours) < 1e-5


def test_hf_export_of_a_global_pool_classifier_is_refused():
    model = randomized_classifier("mae_vit_test", 3)
    with pytest.raises(ValueError, match="cannot express global average pooling"):
        cc.classifier_to_pytorch(model, "hf")


# ----------------------------------------------------------------------------- CLI with torch
def test_cli_official_pth_round_trip(tmp_path, capsys):
    model = randomized(BIGGER, seed=5)
    run = str(tmp_path / "run")
    _save_run(run, [(10, model)])
    pth = str(tmp_path / "mae.pth")
    assert cli.main(["export", "--workdir", run, "--format", "official", "--output", pth]) == 0
    raw = torch.load(pth, map_location="cpu", weights_only=True)["model"]
    assert set(raw) == set(convert.pytorch_shapes(model.config, "official"))
    new = str(tmp_path / "imported")
    args = ["import", "--input", pth, "--model", "mae_vit_test", "--workdir", new]
    for key, value in BIGGER.items():
        if key != "name":
            args += ["--set", f"{key}={value}"]
    assert cli.main(args) == 0
    restored = flat(wdir.read_mae(new, 0)[2])
    want = flat(params_of(model))
    assert restored.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(restored[k], want[k], err_msg=k)
    # An encoder-only (published-style) file: imported with a warning, decoder from --seed.
    enc = {k: v for k, v in raw.items() if not k.startswith(DECODER)}
    enc_path = str(tmp_path / "enc.pth")
    torch.save({"model": enc}, enc_path)
    args[2], args[6] = enc_path, str(tmp_path / "imported2")
    capsys.readouterr()
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "encoder only" in captured.err
    assert "decoder freshly initialized" in captured.out
    meta_cfg = dataclasses.asdict(model.config)
    assert wdir.Reader(args[6]).meta(0)["model"] == meta_cfg
