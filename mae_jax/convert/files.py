"""Reading and writing PyTorch-side files: `.pth` (torch, `weights_only` loading only),
`.safetensors` (numpy API of the safetensors package, no torch needed) and Hugging Face
directories (`config.json` + `model.safetensors`).

torch / safetensors are imported lazily, only by the functions that need them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from mae_jax.convert import mapping
from mae_jax.models.config import MAEConfig

TORCH_EXTS = (".pth", ".pt", ".bin")
SAFETENSORS_EXT = ".safetensors"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_CONFIG = "config.json"
_WRAPPER_KEYS = ("model", "state_dict")


def _require(module: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the '{module.split('.')[0]}' package (pip install "
            f"'mae-jax[torch]'): {e}"
        ) from e


# ----------------------------------------------------------------------------- reading
def tensor_to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like -> numpy (half/bfloat16 tensors widened to float32)."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor, duck-typed
        t = value.detach().cpu()
        if t.is_floating_point() and t.element_size() < 4:
            t = t.float()
        return t.numpy()
    return np.asarray(value)


def unwrap(obj: Any) -> dict[str, np.ndarray]:
    """A loaded checkpoint -> flat `{name: numpy array}`: accepts the official
    `{'model': state_dict, ...}` wrapper (also `'state_dict'`) and strips DDP `module.`."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping), got {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"state dict keys must be strings, got {key!r}")
        if isinstance(value, Mapping) or not (hasattr(value, "shape")):
            raise ValueError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                f"is this a full training checkpoint without a 'model' entry?"
            )
        out[key] = tensor_to_numpy(value)
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def load_torch_file(path: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU. Only tensors and plain containers are
    unpickled (plus `argparse.Namespace`, which the official training checkpoints hold under
    'args'); any other object makes it fail with ValueError."""
    torch = _require("torch", f"reading {path}")
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is not None:
            with safe([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError variants
        if isinstance(e, (FileNotFoundError, IsADirectoryError)):
            raise
        raise ValueError(
            f"could not load {path} with torch.load(weights_only=True); files holding "
            f"arbitrary Python objects are refused. torch said: {e}"
        ) from e


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    st = _require("safetensors.numpy", f"reading {path}")
    return dict(st.load_file(path))


def read_hf_config(directory: str) -> dict | None:
    path = os.path.join(directory, HF_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_hf_dir(directory: str) -> dict[str, np.ndarray]:
    """Weights of a Hugging Face model directory (single or sharded safetensors, or a
    `pytorch_model.bin`)."""
    single = os.path.join(directory, HF_WEIGHTS)
    index = os.path.join(directory, HF_INDEX)
    if os.path.exists(single):
        return load_safetensors(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(load_safetensors(os.path.join(directory, shard)))
        return out
    legacy = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(legacy):
        return unwrap(load_torch_file(legacy))
    raise ValueError(
        f"{directory} is a directory without {HF_WEIGHTS}, {HF_INDEX} or pytorch_model.bin; "
        f"expected a Hugging Face model directory"
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat `{name: numpy array}` from a `.pth`/`.pt`/`.bin` file, a `.safetensors` file or a
    Hugging Face directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_hf_dir(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.endswith(SAFETENSORS_EXT):
        return load_safetensors(path)
    if path.endswith(TORCH_EXTS):
        return unwrap(load_torch_file(path))
    raise ValueError(
        f"cannot tell the file type of {path}: expected a {'/'.join(TORCH_EXTS)} file, a "
        f"{SAFETENSORS_EXT} file or a Hugging Face model directory"
    )


# ----------------------------------------------------------------------------- HF config
def hf_config(config: MAEConfig, img_size: int | None = None) -> dict:
    """A `ViTMAEConfig`-compatible dict (`config.json`) for `config`."""
    return {
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": int(config.embed_dim * config.mlp_ratio),
        "decoder_hidden_size": config.decoder_embed_dim,
        "decoder_num_hidden_layers": config.decoder_depth,
        "decoder_num_attention_heads": config.decoder_num_heads,
        "decoder_intermediate_size": int(config.decoder_embed_dim * config.mlp_ratio),
        "image_size": config.img_size if img_size is None else img_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "mask_ratio": config.mask_ratio,
        "norm_pix_loss": config.norm_pix_loss,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
    }


_HF_STRUCTURE = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
    "patch_size",
    "num_channels",
)


def check_hf_config(hf: Mapping, config: MAEConfig) -> list[str]:
    """Raise ValueError when a HF `config.json` describes another architecture than `config`
    (heads do not show in shapes); return notes on numeric settings that differ (LayerNorm eps,
    activation), which load but change results slightly."""
    ours = hf_config(config)
    bad = [
        f"{k}={hf[k]!r} (model: {ours[k]!r})" for k in _HF_STRUCTURE if k in hf and hf[k] != ours[k]
    ]
    if hf.get("qkv_bias", True) is not True:
        bad.append("qkv_bias=False (model: True)")
    if bad:
        raise ValueError(
            f"the Hugging Face config.json does not match model {config.name}: " + ", ".join(bad)
        )
    notes = []
    eps = hf.get("layer_norm_eps", 1e-12)
    if abs(eps - 1e-6) > 1e-12:
        notes.append(f"config.json has layer_norm_eps={eps}; this model uses 1e-6")
    if hf.get("hidden_act", "gelu") != "gelu":
        notes.append(
            f"config.json has hidden_act={hf['hidden_act']!r}; this model uses exact 'gelu'"
        )
    return notes


# ----------------------------------------------------------------------------- writing
def _check_target(path: str, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite (--force) to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def _atomic_write(path: str, write) -> None:
    """`write(tmp_path)` then rename into place, so a failed write leaves no partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_torch_file(
    state_dict: Mapping[str, np.ndarray], path: str, *, overwrite: bool = False
) -> None:
    """`torch.save({'model': state_dict}, path)` with float32 tensors (the official layout)."""
    torch = _require("torch", f"writing {path}")
    _check_target(path, overwrite)
    tensors = {
        k: torch.from_numpy(np.array(v, order="C", copy=True)) for k, v in state_dict.items()
    }
    _atomic_write(path, lambda tmp: torch.save({"model": tensors}, tmp))


def save_safetensors(
    state_dict: Mapping[str, np.ndarray], path: str, *, overwrite: bool = False
) -> None:
    """A `.safetensors` file (metadata `format: pt`, as PyTorch libraries expect)."""
    st = _require("safetensors.numpy", f"writing {path}")
    _check_target(path, overwrite)
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    _atomic_write(path, lambda tmp: st.save_file(arrays, tmp, metadata={"format": "pt"}))


def save_hf_dir(
    state_dict: Mapping[str, np.ndarray],
    hf_cfg: Mapping,
    directory: str,
    *,
    overwrite: bool = False,
) -> None:
    """A Hugging Face model directory: `config.json` + `model.safetensors`."""
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise FileExistsError(f"{directory} exists and is not a directory")
        if os.listdir(directory) and not overwrite:
            raise FileExistsError(
                f"{directory} already exists and is not empty; pass overwrite (--force)"
            )
    os.makedirs(directory, exist_ok=True)
    save_safetensors(state_dict, os.path.join(directory, HF_WEIGHTS), overwrite=True)
    cfg_path = os.path.join(directory, HF_CONFIG)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(dict(hf_cfg), f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(cfg_path, write)


def save(
    state_dict: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    fmt: str,
    config: MAEConfig,
    *,
    img_size: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write `state_dict` (from `to_pytorch(..., fmt)`) to `path`: a directory for 'hf';
    otherwise `.pth`/`.pt` (torch, `{'model': ...}` wrapper) or `.safetensors`. Returns path."""
    mapping.check_format(fmt)
    path = os.fspath(path)
    if fmt == "hf":
        if path.endswith(TORCH_EXTS + (SAFETENSORS_EXT,)):
            raise ValueError(f"the 'hf' format writes a directory; got the file name {path}")
        save_hf_dir(state_dict, hf_config(config, img_size), path, overwrite=overwrite)
    elif path.endswith((".pth", ".pt")):
        save_torch_file(state_dict, path, overwrite=overwrite)
    elif path.endswith(SAFETENSORS_EXT):
        save_safetensors(state_dict, path, overwrite=overwrite)
    else:
        raise ValueError(
            f"output {path} must end with .pth, .pt or .safetensors for the {fmt!r} format"
        )
    return path
