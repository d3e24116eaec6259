"""locnet_jax: multi-scale shift-equivariant Loc-Nets for 3-D landmark detection, in JAX/Flax.

Data flows one way, each stage importing only the ones before it:
base (`geometry`, `io`, `dataset`, `parallel`, `xla_env`) -> `data` | `model` -> `from_config`
-> `train` -> `eval`. `tests/test_layering.py` checks it.
"""

__version__ = "0.1.0"
