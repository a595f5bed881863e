"""Evaluation of encoders, apart from training: top-k accuracy and weighted k-NN."""

from mae_jax.evaluate.knn import encoder_features, knn_accuracy, knn_classify, nearest_neighbors
from mae_jax.evaluate.metrics import topk_accuracy, topk_correct

__all__ = [
    "encoder_features",
    "knn_accuracy",
    "knn_classify",
    "nearest_neighbors",
    "topk_accuracy",
    "topk_correct",
]
