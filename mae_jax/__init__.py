"""mae-jax: Masked Autoencoders (He et al., CVPR 2022) in JAX and Flax NNX."""

__version__ = "0.1.0"
