"""The input subsystem: sources (TFDS, image folders, the embedded set), the tf.data pipeline
(per-host, resumable), crop/flip augmentation, RandAugment / random erasing (TensorFlow) and
mixup / cutmix (JAX). TensorFlow is imported lazily (`lazy_tf`), never by `import mae_jax`."""
