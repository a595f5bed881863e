"""Reading and writing PyTorch-side files: `.pth` (torch, `weights_only` loading only),
`.safetensors` (numpy API of the safetensors package, no torch needed) and Hugging Face
directories (`config.json` + `model.safetensors`).

torch / safetensors are imported lazily, only by the functions that need them. Empty, truncated
or damaged inputs and unwritable outputs raise a one-sentence ValueError naming the file; written
files get the usual mode (0o666 less the umask).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import json
import os
import pickle
import re
import secrets
import shutil
import stat
import struct
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from mae_jax.convert import mapping
from mae_jax.models.config import MAEConfig
from mae_jax.spec import first_line

TORCH_EXTS = (".pth", ".pt", ".bin")
SAFETENSORS_EXT = ".safetensors"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_CONFIG = "config.json"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives
_REDO = "re-download or re-export it"


def _require(module: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the '{module.split('.')[0]}' package (pip install "
            f"'mae-jax[torch]'): {e}"
        ) from e


# ----------------------------------------------------------------------------- reading
def unwrap(obj: Any) -> dict[str, np.ndarray]:
    """A loaded checkpoint -> flat `{name: numpy array}`: accepts the official
    `{'model': state_dict, ...}` wrapper (also `'state_dict'`) and strips DDP `module.`; torch
    tensors become numpy arrays (half/bfloat16 ones widened to float32)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping), got {type(obj).__name__}")
    for key in ("model", "state_dict"):
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
        if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor, duck-typed
            value = value.detach().cpu()
            if value.is_floating_point() and value.element_size() < 4:
                value = value.float()
            value = value.numpy()
        out[key] = np.asarray(value)
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def _torch_file_problem(path: str, error: Exception) -> str:
    """Why `torch.load(path, weights_only=True)` failed with `error`, as one sentence."""
    size = os.path.getsize(path)
    if size == 0:
        return f"{path} is empty (0 bytes); expected a PyTorch state dict saved with torch.save"
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    is_zip = head == _ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(path):
        return (
            f"{path} is truncated: it is the start of a torch.save zip archive ({size:,} bytes) "
            f"whose end, the archive directory, is missing; {_REDO}"
        )
    if not is_zip and not head.startswith(b"\x80"):  # pickles (protocol 2+) start so
        return (
            f"{path} is damaged or not a PyTorch state dict: it is neither a torch.save zip "
            f"archive nor a pickle ({size:,} bytes); expected a file saved with torch.save"
        )
    if isinstance(error, pickle.UnpicklingError):  # the weights_only loader's refusal
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n|$)", str(error))
        reason = found.group(1).strip() if found else first_line(error)
        return (
            f"could not load {path} with torch.load(weights_only=True), which refuses files "
            f"holding arbitrary Python objects or pickle code it does not support ({reason}); "
            f"expected a state dict of tensors saved with torch.save"
        )
    if not is_zip and (
        isinstance(error, (EOFError, struct.error)) or "unexpected EOF" in str(error)
    ):
        return f"{path} is truncated: its data ends early, after {size:,} bytes; {_REDO}"
    return (
        f"{path} is damaged or not a PyTorch state dict ({size:,} bytes): torch.load could not "
        f"read it ({first_line(error)}); expected a file saved with torch.save"
    )


def load_torch_file(path: str) -> dict[str, np.ndarray]:
    """`torch.load(path, weights_only=True)` on the CPU, `unwrap`ped. Only tensors and plain
    containers are unpickled (plus `argparse.Namespace`, which the official training checkpoints
    hold under 'args'); any other object, and an empty, truncated or damaged file, raise
    ValueError."""
    torch = _require("torch", f"reading {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # torch raises UnpicklingError / RuntimeError / OSError variants
        raise ValueError(_torch_file_problem(path, e)) from e
    try:
        return unwrap(obj)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _safetensors_problem(path: str, error: Exception) -> str:
    """Why safetensors could not read `path` (failing with `error`), as one sentence."""
    size = os.path.getsize(path)
    if size == 0:
        return f"{path} is empty (0 bytes); expected a safetensors file"
    with open(path, "rb") as f:  # layout: u64 header length, JSON header, tensor data
        head = f.read(9)
        n = int.from_bytes(head[:8], "little")
        if len(head) < 9 or head[8:] != b"{":
            return (
                f"{path} is damaged or not a safetensors file: it does not start with a "
                f"safetensors header ({size:,} bytes); expected a safetensors file"
            )
        if 8 + n > size:
            return (
                f"{path} is truncated: it ends after {size:,} bytes, inside its {n:,}-byte "
                f"header; {_REDO}"
            )
        f.seek(8)
        try:
            header = json.loads(f.read(n))
            data = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{path} is damaged: its safetensors header is not valid; {_REDO}"
    if 8 + n + data > size:
        return (
            f"{path} is truncated: it has {size:,} of the {8 + n + data:,} bytes its header "
            f"describes; {_REDO}"
        )
    return f"{path} is damaged: safetensors could not read it ({first_line(error)}); {_REDO}"


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file (ValueError if it is empty, truncated or damaged)."""
    st = _require("safetensors.numpy", f"reading {path}")
    try:
        return dict(st.load_file(path))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ValueError(_safetensors_problem(path, e)) from e


def _read_json(path: str, what: str) -> dict:
    """The JSON object in `path` (`what` it should hold, for messages)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        value = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = "empty" if not raw.strip() else f"not valid JSON ({e})"
        raise ValueError(f"{path} is {problem}; expected {what} (a JSON object)") from e
    if not isinstance(value, dict):
        raise ValueError(
            f"{path} holds a JSON {type(value).__name__}; expected {what} (a JSON object)"
        )
    return value


def load_hf_dir(directory: str) -> dict[str, np.ndarray]:
    """Weights of a Hugging Face model directory (single or sharded safetensors, or a
    `pytorch_model.bin`)."""
    single = os.path.join(directory, HF_WEIGHTS)
    index = os.path.join(directory, HF_INDEX)
    if os.path.exists(single):
        return load_safetensors(single)
    if os.path.exists(index):
        weight_map = _read_json(index, "a safetensors shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(
                f"{index} has no 'weight_map' object; expected a safetensors shard index"
            )
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            shard_path = os.path.join(directory, shard)
            if not os.path.isfile(shard_path):
                raise ValueError(f"{index} lists the shard {shard}, which is missing")
            out.update(load_safetensors(shard_path))
        return out
    legacy = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(legacy):
        return load_torch_file(legacy)
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
        return load_torch_file(path)
    raise ValueError(
        f"cannot tell the file type of {path}: expected a {'/'.join(TORCH_EXTS)} file, a "
        f"{SAFETENSORS_EXT} file or a Hugging Face model directory"
    )


@dataclasses.dataclass(frozen=True)
class Loaded:
    """An input read once (`load_input`), to be read again without reloading."""

    state_dict: dict[str, np.ndarray]
    source: str  # the path, or "the state dict"
    hf_cfg: dict | None  # a Hugging Face directory's config.json


def load_input(state_dict_or_path: Any) -> Loaded:
    """A state dict, a `.pth` / `.safetensors` file or a Hugging Face directory (its
    `config.json` read first) as a flat numpy state dict; a `Loaded` is returned as is."""
    if isinstance(state_dict_or_path, Loaded):
        return state_dict_or_path
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        source, hf_cfg = os.fspath(state_dict_or_path), None
        if os.path.isdir(source):  # a Hugging Face directory: its config.json first
            config_json = os.path.join(source, HF_CONFIG)
            if not os.path.isfile(config_json):
                raise ValueError(
                    f"{source} has no {HF_CONFIG}; expected a Hugging Face model directory "
                    f"({HF_CONFIG} + {HF_WEIGHTS}), or pass the weights file itself"
                )
            hf_cfg = _read_json(config_json, "the Hugging Face model config")
        return Loaded(load_state_dict(source), source, hf_cfg)
    return Loaded(unwrap(state_dict_or_path), "the state dict", None)


def read_input(
    state_dict_or_path: Any, config: MAEConfig
) -> tuple[dict[str, np.ndarray], str, str]:
    """`(state dict, source, format)` of an input (`load_input`) read for the model `config`:
    the format detected, HF names normalized and an HF `config.json` checked (notes: warnings)."""
    loaded = load_input(state_dict_or_path)
    sd, fmt = loaded.state_dict, mapping.detect_format(loaded.state_dict)
    if fmt == "hf":
        sd = mapping.normalize_hf_names(sd)
        if loaded.hf_cfg is not None:
            for note in check_hf_config(loaded.hf_cfg, config):
                warnings.warn(f"{loaded.source}: {note}", stacklevel=3)
    return sd, loaded.source, fmt


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


# The `config.json` fields that fix the architecture
_HF_STRUCTURE = [
    f"{prefix}{field}"
    for prefix in ("", "decoder_")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
] + ["patch_size", "num_channels"]


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
def _write_error(path: str, error: Exception, disk_full: bool = False) -> ValueError:
    """ValueError for an output `path` that could not be written, with the reason."""
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)  # nearest existing folder (or file in the way)
    if not os.path.isdir(existing):
        reason = f"{existing} is a file, not a directory; expected a path in a directory"
    elif isinstance(error, PermissionError):
        reason = f"permission denied in {existing}; expected a writable directory"
    elif disk_full or getattr(error, "errno", None) == errno.ENOSPC:
        reason = "no space left on device"
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror[:1].lower() + error.strerror[1:]
    else:
        reason = f"the write failed ({first_line(error)})"
    return ValueError(f"cannot write {path}: {reason}")


def _make_dirs(directory: str, path: str) -> list[str]:
    """Create `directory` and its missing parents for writing `path`; return those created."""
    created, missing = [], os.path.abspath(directory)
    while not os.path.lexists(missing) and os.path.dirname(missing) != missing:
        created.insert(0, missing)
        missing = os.path.dirname(missing)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        _remove_dirs(created)
        raise _write_error(path, e) from e
    return created


def _remove_dirs(created: list[str]) -> None:
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _check_target(path: str, overwrite: bool) -> list[str]:
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite (--force) to replace it")
    return _make_dirs(os.path.dirname(os.path.abspath(path)), path)


def _atomic_write(path: str, write, created: list[str] = ()) -> None:
    """`write(tmp_path)` then rename into place, so a failed write leaves no partial file (nor
    the folders `created` for it). The file gets the usual mode, 0o666 less the umask."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(6)}-{name}")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask
        write(tmp)
        os.chmod(tmp, mode)  # writers may recreate the file owner-only (safetensors does)
        os.replace(tmp, path)
    except BaseException as e:
        # torch and safetensors report I/O failures (a full disk) as their own errors
        io = isinstance(e, (OSError, RuntimeError)) or type(e).__module__.startswith("safetensors")
        full = False
        with contextlib.suppress(OSError):  # measured before the partial file goes
            full = io and shutil.disk_usage(directory).free < 2**20
        if os.path.lexists(tmp):
            os.remove(tmp)
        _remove_dirs(list(created))
        if io:
            raise _write_error(path, e, full) from e
        raise


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str, overwrite: bool) -> None:
    """A `.safetensors` file (metadata `format: pt`, as PyTorch libraries expect)."""
    st = _require("safetensors.numpy", f"writing {path}")
    created = _check_target(path, overwrite)
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    _atomic_write(path, lambda tmp: st.save_file(arrays, tmp, metadata={"format": "pt"}), created)


def save_hf_dir(state_dict: Mapping, hf_cfg: Mapping, directory: str, overwrite: bool) -> None:
    """A Hugging Face model directory: `config.json` + `model.safetensors`."""
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise FileExistsError(f"{directory} exists and is not a directory")
        if os.listdir(directory) and not overwrite:
            raise FileExistsError(
                f"{directory} already exists and is not empty; pass overwrite (--force)"
            )
    created = _make_dirs(directory, directory)
    weights = os.path.join(directory, HF_WEIGHTS)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(dict(hf_cfg), f, indent=2, sort_keys=True)
            f.write("\n")

    wrote = False
    try:
        save_safetensors(state_dict, weights, overwrite=True)
        wrote = True
        _atomic_write(os.path.join(directory, HF_CONFIG), write)
    except BaseException:  # leave no half-written directory behind
        if wrote and os.path.lexists(weights):
            os.remove(weights)
        _remove_dirs(created)
        raise


def save(
    state_dict: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    fmt: str,
    config: MAEConfig,
    *,
    img_size: int | None = None,
    overwrite: bool = False,
    hf_cfg: Mapping | None = None,
) -> str:
    """Write `state_dict` (from `to_pytorch(..., fmt)`) to `path`: a directory for 'hf';
    otherwise `.pth`/`.pt` (torch, `{'model': ...}` wrapper) or `.safetensors`. Returns path.
    `hf_cfg`: the `config.json` of an 'hf' directory (default: the MAE's `hf_config`)."""
    mapping.check_format(fmt)
    path = os.fspath(path)
    if fmt == "hf":
        if path.endswith(TORCH_EXTS + (SAFETENSORS_EXT,)):
            raise ValueError(f"the 'hf' format writes a directory; got the file name {path}")
        cfg = hf_config(config, img_size) if hf_cfg is None else hf_cfg
        save_hf_dir(state_dict, cfg, path, overwrite)
    elif path.endswith((".pth", ".pt")):
        # torch.save({'model': state_dict}), the official layout: float32 tensors, and int64 for
        # integer arrays such as BatchNorm's `num_batches_tracked`
        torch = _require("torch", f"writing {path}")
        created = _check_target(path, overwrite)
        tensors = {
            k: torch.from_numpy(np.array(v, order="C", copy=True)) for k, v in state_dict.items()
        }
        _atomic_write(path, lambda tmp: torch.save({"model": tensors}, tmp), created)
    elif path.endswith(SAFETENSORS_EXT):
        save_safetensors(state_dict, path, overwrite)
    else:
        raise ValueError(
            f"output {path} must end with .pth, .pt or .safetensors for the {fmt!r} format"
        )
    return path
