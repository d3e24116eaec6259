"""locnet_jax: multi-scale shift-equivariant Loc-Nets for 3-D landmark detection, in JAX/Flax.

Data flows one way: geometry -> ops -> unet -> models -> losses (-> training and evaluation).
"""

__version__ = "0.1.0"
