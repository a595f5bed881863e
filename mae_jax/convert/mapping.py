"""Names and layouts: our parameter tree <-> PyTorch state dicts (official MAE, timm, HF), for the
MAE (`rules`) and for the classifier (`classifier_rules`: official fine-tuned / linear-probed,
timm `VisionTransformer` with its head, HF `ViTForImageClassification`).

Our tree is `nnx.to_pure_dict(nnx.state(model, nnx.Param))` (nested dicts, int keys for block
lists; a classifier's also holds its BatchNorm statistics, `nnx.BatchStat`) plus the fixed
position tables `pos_embed` / `decoder_pos_embed` `[1, 1+L, D]`.
PyTorch layouts: Linear weight `[out, in]` (ours `[in, out]`), LayerNorm `weight` (ours
`scale`), patch embedding Conv2d weight `[D, C, p, p]` (ours `[p*p*C, D]` on (row, col, channel)
patch vectors), and in the HF format the fused `qkv` split into `query`, `key`, `value`.

Everything here is numpy/jax only; torch is never imported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.models import abstract_params, layout
from mae_jax.models.classifier import Head, from_head
from mae_jax.models.config import MAEConfig

FORMATS = ("official", "timm", "hf")

# Rule kinds. BN: running statistics of a BatchNorm without affine parameters (ours `mean`,
# `var`; PyTorch `running_mean`, `running_var`).
TENSOR, POS, LINEAR, NORM, PATCH, QKV, BN = "tensor", "pos", "linear", "norm", "patch", "qkv", "bn"
BN_COUNT = "num_batches_tracked"  # PyTorch's BatchNorm counter (int64 scalar), unused by ours


@dataclasses.dataclass(frozen=True)
class Rule:
    """One module (or tensor) of our tree and its PyTorch name(s)."""

    ours: tuple  # path in our tree: a leaf (TENSOR/POS) or a module prefix
    theirs: tuple  # PyTorch name prefix(es); three for QKV (query, key, value)
    kind: str
    decoder: bool = False

    def torch_keys(self) -> list[str]:
        if self.kind in (TENSOR, POS):
            return [self.theirs[0]]
        if self.kind == BN:
            return [f"{self.theirs[0]}.running_mean", f"{self.theirs[0]}.running_var"]
        return [f"{name}.{leaf}" for name in self.theirs for leaf in ("weight", "bias")]


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


_HF_QKV = tuple(f"attention.attention.{n}" for n in ("query", "key", "value"))
# A transformer block's modules: (our path, kind, official / timm name, HF names); HF splits the
# fused qkv into query, key and value.
_BLOCK = (
    (("norm1",), NORM, "norm1", ("layernorm_before",)),
    (("attn", "qkv"), LINEAR, "attn.qkv", _HF_QKV),
    (("attn", "proj"), LINEAR, "attn.proj", ("attention.output.dense",)),
    (("norm2",), NORM, "norm2", ("layernorm_after",)),
    (("mlp", "fc1"), LINEAR, "mlp.fc1", ("intermediate.dense",)),
    (("mlp", "fc2"), LINEAR, "mlp.fc2", ("output.dense",)),
)
# The encoder's other names: cls token, position table, patch embedding, block list, final norm
_ENCODER = {
    False: ("cls_token", "pos_embed", "patch_embed.proj", "blocks", "norm"),
    True: (
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection",
        "vit.encoder.layer",
        "vit.layernorm",
    ),
}


def _block_rules(ours: tuple, theirs: str, hf: bool, decoder: bool) -> list[Rule]:
    out = []
    for sub, kind, official, hf_names in _BLOCK:
        names = tuple(f"{theirs}.{n}" for n in (hf_names if hf else (official,)))
        out.append(Rule(ours + sub, names, QKV if len(names) == 3 else kind, decoder))
    return out


def _encoder_rules(config: MAEConfig, hf: bool) -> list[Rule]:
    """The encoder's rules, its final `norm` last."""
    cls, pos, patch, block, norm = _ENCODER[hf]
    enc = [
        Rule(("cls_token",), (cls,), TENSOR),
        Rule(("pos_embed",), (pos,), POS),
        Rule(("patch_embed", "proj"), (patch,), PATCH),
    ]
    for i in range(config.depth):
        enc += _block_rules(("blocks", i), f"{block}.{i}", hf, False)
    return enc + [Rule(("norm",), (norm,), NORM)]


def rules(config: MAEConfig, fmt: str) -> list[Rule]:
    """The mapping of every tensor of `config`'s model for `fmt` (timm: encoder rules only)."""
    check_format(fmt)
    hf = fmt == "hf"
    enc = _encoder_rules(config, hf)
    if fmt == "timm":
        return enc
    prefix, block = ("decoder.", "decoder.decoder_layers") if hf else ("", "decoder_blocks")

    def dec(name, kind):
        return Rule((name,), (prefix + name,), kind, True)

    out = enc + [dec("decoder_embed", LINEAR), dec("mask_token", TENSOR)]
    out.append(dec("decoder_pos_embed", POS))
    for i in range(config.decoder_depth):
        out += _block_rules(("decoder_blocks", i), f"{block}.{i}", hf, True)
    return out + [dec("decoder_norm", NORM), dec("decoder_pred", LINEAR)]


def classifier_rules(config: MAEConfig, head, fmt: str) -> list[Rule]:
    """The mapping of a classifier (`head`: a `models.classifier.Head`) for `fmt`, named as
    `mae_jax.convert.classifier`'s docstring says. timm and HF have a plain Linear head: fold a
    linear probe's BatchNorm into it first (`fold_batchnorm`); HF has no global pooling."""
    check_format(fmt)
    hf = fmt == "hf"
    if hf and head.global_pool:
        raise ValueError(
            "Hugging Face ViTForImageClassification classifies the cls token after the final "
            "layernorm; it cannot express global average pooling + fc_norm, so this model "
            "(global_pool=True) cannot be exported to it: use the 'timm' or 'official' format"
        )
    if head.linear_probe and fmt != "official":
        raise ValueError(
            f"the {fmt!r} format has a Linear head: fold the linear probe's BatchNorm into it "
            f"first (fold_batchnorm)"
        )
    out = _encoder_rules(config, hf)
    if head.global_pool:
        out = [r for r in out if r.ours != ("norm",)]
        out.append(Rule(("fc_norm",), ("fc_norm",), NORM))
    if hf:
        return out + [Rule(("head",), ("classifier",), LINEAR)]
    if head.linear_probe:
        return out + [Rule(("head", 0), ("head.0",), BN), Rule(("head", 1), ("head.1",), LINEAR)]
    return out + [Rule(("head",), ("head",), LINEAR)]


# ----------------------------------------------------------------------------- tree helpers
def _set(tree: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def assign(target: dict, source: Mapping, path: tuple = ()) -> None:
    """Write `source`'s leaves into the nested dict `target` in place, each cast to the
    dtype of the array it replaces (ValueError naming the entry on a shape mismatch)."""
    for key, value in source.items():
        if isinstance(value, Mapping):
            assign(target[key], value, path + (key,))
            continue
        old = target[key]
        if tuple(old.shape) != tuple(np.shape(value)):
            raise ValueError(
                f"{'.'.join(map(str, path + (key,)))}: shape {np.shape(value)} "
                f"does not fit {tuple(old.shape)}"
            )
        target[key] = jnp.asarray(value, dtype=old.dtype)


def set_weights(model, tree: Mapping, what=nnx.Param) -> None:
    """Write `tree` (nested dict of arrays, blocks per block or stacked) into `model`'s
    variables selected by the filter `what`, in place (see `assign`); variables the tree lacks
    keep their values."""
    state = nnx.state(model, what)
    pure = nnx.to_pure_dict(state)
    assign(pure, layout.like(tree, pure))  # stacked when the model scans
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


# ----------------------------------------------------------------------------- ours -> torch
def _to_torch(params: Mapping, rule_list: list[Rule], config: MAEConfig, tables: Mapping) -> dict:
    """Layout conversion with array methods only, so it also runs on tracers (shapes).
    `tables`: the position tables `{'pos_embed': ..., 'decoder_pos_embed': ...}` the rules use."""
    p, c = config.patch_size, config.in_chans
    out: dict[str, Any] = {}
    for rule in rule_list:
        name = rule.theirs[0]
        if rule.kind == POS:
            out[name] = tables[rule.ours[0]]
            continue
        node = functools.reduce(operator.getitem, rule.ours, params)
        if rule.kind == TENSOR:
            out[name] = node
        elif rule.kind == NORM:
            out[f"{name}.weight"], out[f"{name}.bias"] = node["scale"], node["bias"]
        elif rule.kind == BN:
            out[f"{name}.running_mean"], out[f"{name}.running_var"] = node["mean"], node["var"]
        elif rule.kind == LINEAR:
            out[f"{name}.weight"], out[f"{name}.bias"] = node["kernel"].T, node["bias"]
        elif rule.kind == PATCH:
            out[f"{name}.weight"] = node["kernel"].reshape(p, p, c, -1).transpose(3, 2, 0, 1)
            out[f"{name}.bias"] = node["bias"]
        elif rule.kind == QKV:
            kernel, bias = node["kernel"], node["bias"]
            for j, part in enumerate(rule.theirs):
                rows = slice(j * kernel.shape[0], (j + 1) * kernel.shape[0])
                out[f"{part}.weight"], out[f"{part}.bias"] = kernel[:, rows].T, bias[rows]
    return out


def params_to_pytorch(
    params: Mapping, config: MAEConfig, rule_list: list[Rule], tables: Mapping
) -> dict[str, np.ndarray]:
    """Our params (pure dict) -> flat `{torch name: float32 numpy array}` named by `rule_list`
    (`rules`, or a classifier's `classifier_rules`); `tables`: the position tables
    `[1, 1+L, D]` by name (`pos_embed`, `decoder_pos_embed`), already at the target grid."""
    params = jax.tree.map(lambda x: np.asarray(x).astype(np.float32), params)
    tables = {k: np.asarray(v, np.float32) for k, v in tables.items()}
    out = _to_torch(params, rule_list, config, tables)
    return {k: np.array(v, dtype=np.float32, order="C", copy=True) for k, v in out.items()}


@functools.lru_cache(maxsize=16)
def _abstract_classifier(config: MAEConfig, head) -> dict:
    """A classifier's tree (Params and BatchNorm statistics) of `config` and `head` with
    `jax.ShapeDtypeStruct` leaves (nothing allocated); cached: read, never change."""
    small = dataclasses.replace(config, depth=1, scan_layers=False)  # as `models.abstract_params`
    model = nnx.eval_shape(lambda: from_head(small, head))
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    tree["blocks"] = {i: tree["blocks"][0] for i in range(config.depth)}
    return tree


def _shapes(rule_list: list[Rule], tree: dict, config: MAEConfig, grid: int | None) -> dict:
    g = config.grid_size if grid is None else grid
    rows = (1, 1 + g * g)
    tables = {
        "pos_embed": jax.ShapeDtypeStruct((*rows, config.embed_dim), np.float32),
        "decoder_pos_embed": jax.ShapeDtypeStruct((*rows, config.decoder_embed_dim), np.float32),
    }
    out = jax.eval_shape(lambda prm, t: _to_torch(prm, rule_list, config, t), tree, tables)
    return {k: tuple(v.shape) for k, v in out.items()}


def pytorch_shapes(
    config: MAEConfig, fmt: str = "official", grid: int | None = None
) -> dict[str, tuple[int, ...]]:
    """`{torch name: shape}` of `fmt`'s state dict for `config` (position tables on `grid`,
    default the config's), computed without allocating any parameter."""
    return _shapes(rules(config, fmt), abstract_params(config), config, grid)


def classifier_shapes(
    config: MAEConfig, head, fmt: str = "official", grid: int | None = None
) -> dict[str, tuple[int, ...]]:
    """`{torch name: shape}` of a classifier's state dict in `fmt` (see `classifier_rules`;
    a linear probe's in 'official' only), without allocating any parameter."""
    return _shapes(
        classifier_rules(config, head, fmt), _abstract_classifier(config, head), config, grid
    )


# ----------------------------------------------------------------------------- torch -> ours
def _from_torch(sd: Mapping[str, np.ndarray], rule: Rule):
    """The value(s) of `rule` in our layout from a numpy state dict."""
    name = rule.theirs[0]
    if rule.kind in (TENSOR, POS):
        return sd[name]
    if rule.kind == NORM:
        return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}
    if rule.kind == BN:
        return {"mean": sd[f"{name}.running_mean"], "var": sd[f"{name}.running_var"]}
    if rule.kind == LINEAR:
        return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}
    if rule.kind == PATCH:
        w = sd[f"{name}.weight"]  # [D, C, p, p]
        return {
            "kernel": w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
            "bias": sd[f"{name}.bias"],
        }
    if rule.kind == QKV:
        return {
            "kernel": np.concatenate([sd[f"{n}.weight"].T for n in rule.theirs], axis=1),
            "bias": np.concatenate([sd[f"{n}.bias"] for n in rule.theirs], axis=0),
        }
    raise AssertionError(rule.kind)


def pytorch_to_params(
    sd: Mapping[str, np.ndarray], rule_list: list[Rule], with_decoder: bool
) -> tuple[dict, dict]:
    """Numpy state dict (already validated) -> `(params pure dict, position tables)` by
    `rule_list` (`rules` or `classifier_rules`). Without `with_decoder`, only encoder entries
    are read. Position tables are returned as found (`{'pos_embed': ..., 'decoder_pos_embed':
    ...}`), not resized."""
    params: dict = {}
    tables: dict = {}
    for rule in (r for r in rule_list if with_decoder or not r.decoder):
        value = _from_torch(sd, rule)
        if rule.kind == POS:
            tables[rule.ours[0]] = value
        else:
            _set(params, rule.ours, value)
    return params, tables


# ----------------------------------------------------------------------------- key handling
_HF_NEW_NAME = re.compile(
    r"^(vit\.layers|decoder\.decoder_layers)\.(\d+)\.(attention\.[qkvo]_proj|mlp\.fc[12])\."
)
_HF_NEW_TO_CLASSIC = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_HF_SAVED_DECODER = "decoder.decoder_encoder.layer."  # transformers 5 save_pretrained


def normalize_hf_names(sd: Mapping[str, Any]) -> dict[str, Any]:
    """HF keys in the classic (hub) naming: accepts `ViTMAEModel` keys (no `vit.` prefix), the
    in-memory naming of transformers 5 (`vit.layers.{i}.attention.q_proj`, `mlp.fc1`, ...) and
    the decoder names its `save_pretrained` writes (`decoder.decoder_encoder.layer.{i}`)."""
    out = {}
    for key, value in sd.items():
        if key.startswith(("embeddings.", "encoder.layer.", "layernorm.", "layers.")):
            key = "vit." + key
        if key.startswith(_HF_SAVED_DECODER):
            key = "decoder.decoder_layers." + key[len(_HF_SAVED_DECODER) :]
        m = _HF_NEW_NAME.match(key)
        if m:
            stack = "vit.encoder.layer" if m.group(1) == "vit.layers" else m.group(1)
            key = f"{stack}.{m.group(2)}.{_HF_NEW_TO_CLASSIC[m.group(3)]}.{key[m.end() :]}"
        elif key.startswith("vit.layers."):  # layer norms of the newer naming
            key = "vit.encoder.layer." + key[len("vit.layers.") :]
        out[key] = value
    return out


def detect_format(keys: Iterable[str]) -> str:
    """'hf', 'official' (MAE with decoder) or 'timm' (encoder keys only) from state-dict keys."""
    keys = list(keys)
    if any(k.startswith(("vit.", "embeddings.patch_embeddings", "decoder.decoder_")) for k in keys):
        return "hf"
    if "patch_embed.proj.weight" in keys or any(k.startswith("blocks.") for k in keys):
        decoder = any(k.startswith(("decoder_", "mask_token")) for k in keys)
        return "official" if decoder else "timm"
    shown = ", ".join(sorted(keys)[:8]) or "(no keys)"
    raise ValueError(
        "unrecognized state dict: expected official MAE / timm keys ('patch_embed.proj.weight', "
        f"'blocks.0...') or Hugging Face ViTMAE keys ('vit.embeddings...'); found: {shown}"
    )


def classifier_head(sd: Mapping[str, Any]):
    """The `models.classifier.Head` a state dict's keys describe, or None when it has no
    classifier head (an MAE or a bare encoder). Official / timm names: `head.weight`
    (fine-tuned) or `head.1.weight` (linear probe), `fc_norm.*` for global pooling; Hugging Face
    (`normalize_hf_names` applied): `classifier.weight`, always the cls token."""
    for key in ("head.weight", "head.1.weight", "classifier.weight"):
        if key in sd:
            shape = np.shape(sd[key])
            if len(shape) != 2:
                raise ValueError(f"{key} has shape {shape}; expected [num_classes, width]")
            return Head(int(shape[0]), "fc_norm.weight" in sd, key == "head.1.weight")
    return None


def describe(sd: Mapping[str, Any], fmt: str) -> str:
    """What a state dict of format `fmt` ('official', 'timm', 'hf') holds, in words: an MAE, a
    bare encoder or a classifier (for messages: a fine-tuned model has timm's names too)."""
    names = "Hugging Face names" if fmt == "hf" else "official MAE / timm names"
    head = classifier_head(sd)
    if head is not None:
        trained = "linear-probed" if head.linear_probe else "fine-tuned"
        return f"a {trained} classifier, {names}"
    if fmt == "official":
        return "an MAE with its decoder, official format"
    return f"{'an MAE' if fmt == 'hf' else 'an encoder without decoder'}, {names}"


def format_list(items: list[str], limit: int = 25) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def compare_shapes(
    sd: Mapping[str, np.ndarray], wanted: Mapping[str, tuple], rule_list: list[Rule]
) -> tuple[list[str], list[str], list[str]]:
    """`(missing, unexpected, mis-shaped)` keys of `sd` against `wanted` shapes; position tables
    (the POS entries of `rule_list`) may be on any square grid of the right width."""
    pos_keys = {r.theirs[0] for r in rule_list if r.kind == POS}
    missing = [k for k in wanted if k not in sd]
    unexpected = [k for k in sd if k not in wanted]
    misshaped = []
    for k, shape in wanted.items():
        if k not in sd:
            continue
        got = tuple(np.shape(sd[k]))
        if k in pos_keys:
            ok = len(got) == 3 and got[0] == 1 and got[2] == shape[2] and _is_square_table(got[1])
        else:
            ok = got == shape
        if not ok:
            want = f"(1, 1 + h*w, {shape[2]}), e.g. {shape}" if k in pos_keys else str(shape)
            misshaped.append(f"{k}: file {got}, expected {want}")
    return missing, unexpected, misshaped


def _is_square_table(rows: int) -> bool:
    n = rows - 1
    return n > 0 and math.isqrt(n) ** 2 == n


def mismatch_error(what: str, missing, unexpected, misshaped) -> ValueError:
    lines = [f"{what} does not match the model:"]
    for label, keys in zip(
        ("missing", "unexpected", "mis-shaped"), (missing, unexpected, misshaped)
    ):
        if keys:
            lines.append(f"  {label} keys ({len(keys)}): {format_list(keys)}")
    return ValueError("\n".join(lines))
