"""Evaluation of pretrained encoders: kNN, top-k metrics, mixup/cutmix, fine-tuning
augmentations (`augment`, TensorFlow, imported only when used)."""

from mae_jax.evaluate.knn import encoder_features, knn_accuracy, knn_classify, nearest_neighbors
from mae_jax.evaluate.metrics import topk_accuracy, topk_correct
from mae_jax.evaluate.mixup import (
    apply_mix,
    mixup_cutmix,
    sample_mix_params,
    smooth_one_hot,
    soft_target_cross_entropy,
)

__all__ = [
    "apply_mix",
    "encoder_features",
    "knn_accuracy",
    "knn_classify",
    "mixup_cutmix",
    "nearest_neighbors",
    "sample_mix_params",
    "smooth_one_hot",
    "soft_target_cross_entropy",
    "topk_accuracy",
    "topk_correct",
]
