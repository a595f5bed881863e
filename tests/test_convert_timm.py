"""PyTorch interop against timm's `VisionTransformer` (the encoder the official release uses).

timm runs in a subprocess, because timm imports torchvision at import time and the CPU
torch wheel has no matching torchvision on PyPI (PyPI's torchvision is built against CUDA
torch and fails to load its ops beside `torch==2.13.0+cpu`). When `import torchvision` fails in
that subprocess, a placeholder module answers timm's import-time references to torchvision
(dataset/transform classes, FrozenBatchNorm2d); placeholders raise if ever instantiated, and
the ViT computed here never touches torchvision. With a working torchvision, the real one is
used (set MAE_JAX_TIMM_PYTHON to run timm under another interpreter). Either way the model
code, weight loading and forward pass are timm's own.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")
if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed", allow_module_level=True)

from test_convert import BIGGER, DECODER, randomized, randomized_classifier  # noqa: E402

from mae_jax import convert  # noqa: E402
from mae_jax.convert import classifier as cc  # noqa: E402
from mae_jax.convert import mapping  # noqa: E402
from mae_jax.models import resolve  # noqa: E402
from mae_jax.models.classifier import Head  # noqa: E402

NAMED = {
    "vit_base_patch16_224": "mae_vit_base_patch16",
    "vit_large_patch16_224": "mae_vit_large_patch16",
    "vit_huge_patch14_224": "mae_vit_huge_patch14",
}
# Classifier exports timm must load strictly and compute our logits with (BIGGER, 7 classes).
CLASSIFIERS = {
    "finetuned_gap": dict(global_pool=True),
    "finetuned_cls": dict(global_pool=False),
    "probe_cls": dict(global_pool=False, linear_probe=True),
    "probe_gap": dict(global_pool=True, linear_probe=True),
}

SCRIPT = textwrap.dedent(r'''
    import importlib.abc, importlib.machinery, json, sys, types


    def install_torchvision_placeholder():
        """Any `torchvision.*` import gives a module whose attributes are placeholder classes
        (attribute access on them gives more placeholders; instantiating one raises)."""
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]

        class Meta(type):
            def __getattr__(cls, attr):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                return Meta(attr, (Placeholder,), {})

        class Placeholder(metaclass=Meta):
            def __init__(self, *args, **kwargs):
                raise RuntimeError("torchvision placeholder used: " + type(self).__name__)

        class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "torchvision":
                    return importlib.machinery.ModuleSpec(name, self, is_package=True)
                return None

            def create_module(self, spec):
                module = types.ModuleType(spec.name)
                module.__path__ = []

                def getattr_(attr):
                    if attr.startswith("__"):
                        raise AttributeError(attr)
                    return Meta(attr, (Placeholder,), {})

                module.__getattr__ = getattr_
                return module

            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, Finder())


    try:
        import torchvision  # noqa: F401
        torchvision_used = "real " + torchvision.__version__
    except Exception as e:  # missing, or a CUDA build that cannot load beside CPU torch
        install_torchvision_placeholder()
        torchvision_used = "placeholder (" + type(e).__name__ + ")"

    import numpy as np
    import safetensors.torch
    import timm
    import torch
    from timm.models import load_checkpoint
    from timm.models.vision_transformer import VisionTransformer

    job = json.load(open(sys.argv[1]))
    result = {"torchvision": torchvision_used, "timm": timm.__version__, "named": {}}

    for case in job["ours_to_timm"]:  # our timm export, loaded strictly by timm
        model = VisionTransformer(num_classes=0, **case["kwargs"]).eval()
        load_checkpoint(model, case["file"], strict=True)
        with torch.no_grad():
            feats = model.forward_features(torch.from_numpy(np.load(case["images"])))
        np.save(case["out"], feats.numpy())

    for case in job["timm_to_ours"]:  # a random timm ViT for us to import
        torch.manual_seed(case["seed"])
        model = VisionTransformer(num_classes=0, **case["kwargs"]).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            feats = model.forward_features(torch.from_numpy(np.load(case["images"])))
        safetensors.torch.save_file(model.state_dict(), case["file"])
        np.save(case["out"], feats.numpy())

    for case in job["finetune"]:  # what the official fine-tuning code does with our .pth
        checkpoint = torch.load(case["file"], map_location="cpu", weights_only=True)
        state = dict(checkpoint["model"])
        model = VisionTransformer(num_classes=10, global_pool="avg", **case["kwargs"])
        grid = model.patch_embed.grid_size[0]
        pos = state["pos_embed"]
        old = int(round((pos.shape[1] - 1) ** 0.5))
        if old != grid:  # cls row kept, patch rows resized bicubically
            img = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
            img = torch.nn.functional.interpolate(img, size=(grid, grid), mode="bicubic",
                                                  align_corners=False)
            state["pos_embed"] = torch.cat([pos[:, :1], img.permute(0, 2, 3, 1).flatten(1, 2)],
                                           dim=1)
        msg = model.load_state_dict(state, strict=False)
        result["finetune"] = {
            "missing": sorted(msg.missing_keys), "unexpected": sorted(msg.unexpected_keys),
            "pos_embed": list(model.pos_embed.shape),
            "same_qkv": bool(torch.equal(model.blocks[1].attn.qkv.weight,
                                         state["blocks.1.attn.qkv.weight"])),
        }

    for case in job["classifiers"]:  # our classifier exports, loaded strictly by timm
        model = VisionTransformer(**case["kwargs"]).eval()
        load_checkpoint(model, case["file"], strict=True)
        with torch.no_grad():
            logits = model(torch.from_numpy(np.load(case["images"])))
        np.save(case["out"], logits.numpy())

    result["named_classifiers"] = {}
    for name, kwargs in job["named_classifiers"]:  # timm's MAE fine-tuned layout, by name
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
        result["named_classifiers"][name] = {k: list(v.shape) for k, v in model.state_dict().items()}

    for name in job["named"]:  # the timm model names the issue promises, on the meta device
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        result["named"][name] = {k: list(v.shape) for k, v in model.state_dict().items()}

    json.dump(result, open(job["result"], "w"))
''')


def timm_kwargs(config):
    return dict(cc.vit_kwargs(config), qkv_bias=True)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """Prepare every file, run timm once, return (result, models, paths)."""
    tmp = tmp_path_factory.mktemp("timm")
    rng = np.random.default_rng(0)
    job = {
        "ours_to_timm": [],
        "timm_to_ours": [],
        "finetune": [],
        "classifiers": [],
        "named_classifiers": [],
        "named": list(NAMED),
        "result": str(tmp / "result.json"),
    }
    models, images = {}, {}
    for tag, cfg in (("test", "mae_vit_test"), ("bigger", BIGGER)):
        model = randomized(cfg, seed=3)
        c = model.config
        x = rng.standard_normal((2, c.img_size, c.img_size, 3)).astype(np.float32)
        np.save(tmp / f"{tag}_x.npy", x.transpose(0, 3, 1, 2).copy())  # NCHW for torch
        convert.save(convert.to_pytorch(model, "timm"), str(tmp / f"{tag}.safetensors"), "timm", c)
        job["ours_to_timm"].append(
            {
                "kwargs": timm_kwargs(c),
                "file": str(tmp / f"{tag}.safetensors"),
                "images": str(tmp / f"{tag}_x.npy"),
                "out": str(tmp / f"{tag}_feats.npy"),
            }
        )
        job["timm_to_ours"].append(
            {
                "kwargs": timm_kwargs(c),
                "seed": 5,
                "file": str(tmp / f"{tag}_timm.safetensors"),
                "images": str(tmp / f"{tag}_x.npy"),
                "out": str(tmp / f"{tag}_timm_feats.npy"),
            }
        )
        models[tag], images[tag] = model, x
    pth = str(tmp / "bigger.pth")
    convert.save(
        convert.to_pytorch(models["bigger"], "official"), pth, "official", models["bigger"].config
    )
    job["finetune"].append(
        {"file": pth, "kwargs": dict(timm_kwargs(models["bigger"].config), img_size=64)}
    )
    for tag, kw in CLASSIFIERS.items():
        clf = randomized_classifier(BIGGER, 7, seed=6, **kw)
        file = str(tmp / f"{tag}.safetensors")
        convert.save(cc.classifier_to_pytorch(clf, "timm"), file, "timm", clf.config)
        name, kwargs = cc.timm_model(clf.config, clf.head_spec)
        assert name is None  # BIGGER is no timm size: every field is given
        job["classifiers"].append(
            {
                "kwargs": kwargs,
                "file": file,
                "images": str(tmp / "bigger_x.npy"),
                "out": str(tmp / f"{tag}_logits.npy"),
            }
        )
        models[tag] = clf
    for timm_name, preset in NAMED.items():
        name, kwargs = cc.timm_model(resolve(preset), Head(1000, True, False))
        assert name == timm_name
        job["named_classifiers"].append([name, kwargs])
    job_file = tmp / "job.json"
    job_file.write_text(json.dumps(job))
    script = tmp / "run_timm.py"
    script.write_text(SCRIPT)
    # MAE_JAX_TIMM_PYTHON: another interpreter for timm (e.g. a venv with a CUDA torch and its
    # real torchvision); it needs torch, timm, safetensors and numpy only.
    python = os.environ.get("MAE_JAX_TIMM_PYTHON", sys.executable)
    res = subprocess.run(
        [python, str(script), str(job_file)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(open(job["result"]).read())
    print("timm", result["timm"], "torchvision:", result["torchvision"])
    return result, models, images, tmp


def _relerr(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["test", "bigger"])
def test_timm_vit_from_our_export_gives_our_encoder_features(timm_run, tag):
    _, models, images, tmp = timm_run
    theirs = np.load(tmp / f"{tag}_feats.npy")
    ours = np.asarray(models[tag].encode(jnp.asarray(images[tag])))
    assert (
        ours.shape
        == theirs.shape
        == (2, 1 + models[tag].config.num_patches, models[tag].config.embed_dim)
    )
    assert _relerr(ours, theirs) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["test", "bigger"])
def test_our_model_from_a_timm_vit_gives_its_features(timm_run, tag):
    _, models, images, tmp = timm_run
    config = models[tag].config
    with pytest.warns(UserWarning, match="encoder only"):
        ours = convert.from_pytorch(str(tmp / f"{tag}_timm.safetensors"), config)
    theirs = np.load(tmp / f"{tag}_timm_feats.npy")
    assert _relerr(ours.encode(jnp.asarray(images[tag])), theirs) < 1e-5


@pytest.mark.slow
def test_official_finetuning_load_of_our_pth(timm_run):
    """Loaded as the official fine-tuning code does (global pool, strict=False, pos-embed
    interpolation to 64 px): only the head and fc_norm are missing."""
    result, _, _, _ = timm_run
    ft = result["finetune"]
    assert ft["missing"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert all(k.startswith(DECODER) or k in ("norm.weight", "norm.bias") for k in ft["unexpected"])
    assert ft["pos_embed"] == [1, 1 + 8 * 8, BIGGER["embed_dim"]] and ft["same_qkv"]


@pytest.mark.slow
@pytest.mark.parametrize("timm_name", list(NAMED))
def test_timm_named_models_have_our_timm_keys_and_shapes(timm_run, timm_name):
    result, _, _, _ = timm_run
    theirs = {k: tuple(v) for k, v in result["named"][timm_name].items()}
    assert theirs == convert.pytorch_shapes(resolve(NAMED[timm_name]), "timm")


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(CLASSIFIERS))
def test_timm_classifier_from_our_export_gives_our_logits(timm_run, tag):
    """Fine-tuned (global pool + fc_norm, or cls token) and linear-probed (BatchNorm folded into
    the head) classifiers: timm's VisionTransformer loads our export strictly and computes our
    logits on the same images."""
    _, models, images, tmp = timm_run
    theirs = np.load(tmp / f"{tag}_logits.npy")
    ours = np.asarray(models[tag](jnp.asarray(images["bigger"]), train=False))
    assert ours.shape == theirs.shape == (2, 7)
    assert _relerr(ours, theirs) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("timm_name", list(NAMED))
def test_timm_named_classifiers_have_our_fine_tuned_keys_and_shapes(timm_run, timm_name):
    """`timm.create_model(vit_*_patch*_224, global_pool='avg', fc_norm=True, num_classes=1000)`:
    the official fine-tuned layout (fc_norm, head, no norm)."""
    result, _, _, _ = timm_run
    theirs = {k: tuple(v) for k, v in result["named_classifiers"][timm_name].items()}
    head = Head(1000, True, False)
    ours = mapping.classifier_shapes(resolve(NAMED[timm_name]), head, "timm")
    assert theirs == ours and "fc_norm.weight" in ours and "norm.weight" not in ours
