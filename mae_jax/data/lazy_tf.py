"""Lazy TensorFlow import for the input pipeline, hidden from the accelerator.

`import mae_jax` must not pull in TensorFlow (the benchmark tool imports without
it), so data modules call `tf_module()` inside functions. The first call hides
every GPU from TensorFlow so it never grabs accelerator memory next to JAX.
"""

from __future__ import annotations

import functools


@functools.cache
def tf_module():
    """Returns the `tensorflow` module, CPU-only."""
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
