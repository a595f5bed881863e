"""ViT classifier for fine-tuning and linear probing: the timm `VisionTransformer` as the official
MAE fine-tuning (`models_vit.py`) and linear probing (`main_linprobe.py`) use it.

Parameter names mirror the timm state dict: `patch_embed.proj`, `cls_token`, `blocks.{i}.*`,
then `norm` (cls-token pooling) or `fc_norm` (global average pooling over the patch tokens), and
`head`. The encoder (`patch_embed`, `cls_token`, `pos_embed`, `blocks`) is `encoder.Encoder`,
shared with the MAE; here it embeds all patches. For linear probing the head is `head.0` =
BatchNorm1d without affine parameters (eps 1e-6; running `mean`/`var` are `nnx.BatchStat`s)
followed by `head.1` = Linear, exactly the official
`torch.nn.Sequential(BatchNorm1d(affine=False, eps=1e-6), head)` (one difference: flax updates
the running variance with the biased batch variance, PyTorch with the unbiased one, a factor
B/(B-1) that is negligible at probing batch sizes).

Deviation, on purpose: the official fine-tuning model makes `pos_embed` a trainable parameter
(initialized from the checkpoint's fixed sin-cos table). Here it stays a `FixedEmbedding` (not an
`nnx.Param`) holding the same sin-cos table, so it is never updated; MAE's table is fixed
sin-cos and the official recipe gives it a tiny lr (layer id 0) anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax.models.config import MAEConfig, resolve
from mae_jax.models.encoder import ENCODER_KEYS as ENCODER_KEYS  # re-exported: init_from, tasks
from mae_jax.models.encoder import Encoder
from mae_jax.models.vit import Block, layer_norm, normal, zeros
from mae_jax.spec import require

FINETUNE_HEAD_STD = 2e-5  # main_finetune.py: trunc_normal_(head.weight, std=2e-5)
LINPROBE_HEAD_STD = 0.01  # main_linprobe.py: trunc_normal_(head.weight, std=0.01)
BN_EPS = 1e-6  # BatchNorm1d(affine=False, eps=1e-6) of main_linprobe.py
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1 == flax momentum 0.9
# The trainable parameters of linear probing: the head's Linear (`head.1`); the BatchNorm has
# no affine parameters, the encoder is frozen.
LINEAR_PROBE_TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("head"))


@dataclasses.dataclass(frozen=True)
class Head:
    """What a classifier adds to its encoder; with the `MAEConfig`, all that fixes its layout.

    `num_classes`; `global_pool`: mean of the patch tokens + `fc_norm` (else `norm` + cls
    token); `linear_probe`: BatchNorm (no affine) + Linear head (else a Linear head).
    """

    num_classes: int
    global_pool: bool
    linear_probe: bool

    def meta(self) -> dict:
        """The fields as stored in a checkpoint's meta."""
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: Mapping, where: str = "the checkpoint") -> Head:
        """From a checkpoint meta (`meta()`'s fields; `linear_probe` defaults to
        `task == 'linear_probe'`). ValueError when a field is missing or not of its type."""
        values = dict(meta)
        values.setdefault("linear_probe", meta.get("task") == "linear_probe")
        missing = [f.name for f in dataclasses.fields(cls) if values.get(f.name) is None]
        if missing:
            raise ValueError(
                f"{where} says nothing of the classifier's {', '.join(missing)} (meta keys "
                f"{sorted(meta)}); is it a fine-tuning or linear-probing checkpoint?"
            )
        n = values["num_classes"]
        require(f"{where}: num_classes", n, "int>=1")
        return cls(n, bool(values["global_pool"]), bool(values["linear_probe"]))


class ViTClassifier(Encoder):
    """ViT encoder + pooling + linear head. Images NHWC (normalized) -> logits `[N, classes]`.

    Args:
      config: an `MAEConfig` (only its encoder fields are used).
      num_classes: number of output classes.
      global_pool: True: mean of the patch tokens (cls excluded) + `fc_norm` (fine-tuning
        default); False: `norm` then the cls token (linear probing default).
      drop_path_rate: stochastic depth of the last block (0 .. rate over the blocks).
      linear_probe: head = BatchNorm (no affine, eps 1e-6, momentum 0.1 in PyTorch terms)
        then Linear.
      head_init_std: std of the head weights (normal; timm's trunc_normal_ cuts at +-2 in
        absolute value, which never binds at these stds); default 2e-5 (fine-tuning) or 0.01
        (linear probing). Bias zero.
      rngs: `params` stream for the initialization; `dropout` (else `default`) for drop path.
    """

    def __init__(
        self,
        config: MAEConfig,
        num_classes: int,
        *,
        global_pool: bool = True,
        drop_path_rate: float = 0.0,
        linear_probe: bool = False,
        head_init_std: float | None = None,
        rngs: nnx.Rngs,
    ):
        config.validate()
        require("num_classes", num_classes, "int>=1")
        require("drop_path_rate", drop_path_rate, "num[0,1)")
        if head_init_std is None:
            head_init_std = LINPROBE_HEAD_STD if linear_probe else FINETUNE_HEAD_STD
        require("head_init_std", head_init_std, "num>=0")
        self.num_classes = num_classes
        self.global_pool = bool(global_pool)
        self.linear_probe = bool(linear_probe)
        # patch_embed, cls_token, pos_embed, blocks (with drop path)
        super().__init__(config, rngs=rngs, drop_path_rate=float(drop_path_rate))
        c, d = config, config.embed_dim
        kw = dict(dtype=c.compute_dtype, param_dtype=c.storage_dtype, rngs=rngs)
        if self.global_pool:
            self.fc_norm = layer_norm(d, **kw)
        else:
            self.norm = layer_norm(d, **kw)
        f32 = dict(dtype=jnp.float32, rngs=rngs)
        linear = nnx.Linear(
            d,
            num_classes,
            param_dtype=c.storage_dtype,
            kernel_init=normal(float(head_init_std), ("embed", None)),
            bias_init=zeros((None,)),
            **f32,
        )
        if self.linear_probe:
            bn_kw = dict(use_scale=False, use_bias=False, momentum=BN_MOMENTUM, epsilon=BN_EPS)
            bn = nnx.BatchNorm(d, **bn_kw, use_fast_variance=False, **f32)
            self.head = nnx.List([bn, linear])
        else:
            self.head = linear

    @property
    def head_spec(self) -> Head:
        return Head(self.num_classes, self.global_pool, self.linear_probe)

    # ---------------------------------------------------------------------------- forward
    def _set_train(self, train: bool) -> None:
        require("train", train, "bool")
        for block in [self.blocks] if isinstance(self.blocks, Block) else self.blocks:
            if block.drop_path is not None:
                block.drop_path.deterministic = not train

    def tokens(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Encoder tokens before the final norm: `[N, 1+L, D]` (cls first), compute dtype."""
        self._set_train(train)
        return self.encoder_tokens(images)

    def features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Pooled feature `[N, D]` float32: `fc_norm(mean of patch tokens)` or `norm(x)[:, 0]`."""
        x = self.tokens(images, train=train)
        if self.global_pool:
            pooled = jnp.mean(x[:, 1:].astype(jnp.float32), axis=1)
            return self.fc_norm(pooled.astype(x.dtype)).astype(jnp.float32)
        return self.norm(x[:, 0]).astype(jnp.float32)  # LayerNorm is per token

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Normalized images `[N, H, W, C]` -> logits `[N, num_classes]` float32.

        `train` (default False: inference) turns on drop path (drawn from the `dropout` stream)
        and, for linear probing, BatchNorm with batch statistics (and running-statistics
        updates).
        """
        feats = self.features(images, train=train)
        if self.linear_probe:
            bn, linear = self.head
            return linear(bn(feats, use_running_average=not train)).astype(jnp.float32)
        return self.head(feats).astype(jnp.float32)


def from_head(config: MAEConfig, head: Head, *, seed: int = 0, **kw) -> ViTClassifier:
    """A freshly initialized classifier of `config` with `head` (`kw`: `drop_path_rate`,
    `head_init_std`); parameters from `seed`, drop path from `seed + 1`."""
    return ViTClassifier(
        config,
        head.num_classes,
        global_pool=head.global_pool,
        linear_probe=head.linear_probe,
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
        **kw,
    )


def create_classifier(
    name_or_config: Any,
    num_classes: int,
    *,
    seed: int = 0,
    global_pool: bool = True,
    drop_path_rate: float = 0.0,
    linear_probe: bool = False,
    head_init_std: float | None = None,
    **overrides,
) -> ViTClassifier:
    """A freshly initialized classifier from an MAE preset name / `MAEConfig` / mapping.

    `overrides` replace config fields (e.g. `img_size=384`, `dtype="bfloat16"`). Parameters use
    `seed`; drop path uses the `dropout` stream seeded with `seed + 1`.
    """
    config = resolve(name_or_config, **overrides)
    head = Head(num_classes, global_pool, linear_probe)
    kw = dict(drop_path_rate=drop_path_rate, head_init_std=head_init_std)
    return from_head(config, head, seed=seed, **kw)


def merge_trees(*trees: Mapping) -> dict:
    """Nested dicts merged key by key (e.g. a checkpoint's 'params', 'frozen', 'batch_stats')."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                prior = out.get(key)
                value = merge_trees(prior, value) if isinstance(prior, dict) else merge_trees(value)
            out[key] = value
    return out
