"""Lazy TensorFlow import for the input pipeline, hidden from the accelerator.

`import mae_jax` must not pull in TensorFlow (the benchmark tool imports without
it), so data modules call `tf_module()` inside functions. The first call hides
every GPU from TensorFlow so it never grabs accelerator memory next to JAX.
"""

from __future__ import annotations

import functools
import os


def set_environment() -> None:
    """Environment for TensorFlow, set before it is imported: its oneDNN kernels off (unless the
    user set `TF_ENABLE_ONEDNN_OPTS`). Our input pipeline gains nothing from them, TensorFlow
    says they may round differently from its default kernels, and on some CPUs they log
    "oneDNN supports DT_UINT8 only on platforms with AVX-512" at ERROR level during training
    (seen on a CPU with AVX-512) before falling back to those default kernels anyway."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


@functools.cache
def tf_module():
    """Returns the `tensorflow` module, CPU-only."""
    set_environment()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        # Devices were already initialized by someone else; keep going on CPU ops.
        pass
    return tf


@functools.cache
def tfds_module():
    """Returns the `tensorflow_datasets` module (after hiding GPUs from TF)."""
    tf_module()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds


def graph_fn(fn):
    """Marks a tf.data map/filter function as plain graph code (no AutoGraph).

    Our functions use explicit tf.cond; skipping AutoGraph's source conversion
    makes building a pipeline several times faster.
    """
    return tf_module().autograph.experimental.do_not_convert(fn)
