"""XLA settings the entry points apply before JAX starts its backend (XLA reads XLA_FLAGS then, once).

Channels-last convolutions on GPUs: left to itself, XLA lays the U-Nets' 3-D convolutions out as NCDHW
and cuDNN converts every operand to NDHWC and back around each call (the nchwToNhwc / nhwcToNchw kernels
take a quarter or more of the device time: `benchmarks/results/h200_profile.txt`).
`--xla_gpu_force_conv_nhwc=true` keeps them channels-last, which is faster for every workload measured
(forward, training step, 50-pass uncertainty; docs/performance.md, `h200_profile_nhwc.txt`). The flag is
a GPU option; CPUs ignore it. A layout named in XLA_FLAGS
by the user (either force flag) is left as it is: `XLA_FLAGS=--xla_gpu_force_conv_nhwc=false` restores
XLA's own choice.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CHANNELS_LAST_FLAG = "--xla_gpu_force_conv_nhwc=true"
_LAYOUT_FLAGS = ("--xla_gpu_force_conv_nhwc", "--xla_gpu_force_conv_nchw")


def with_channels_last_convolutions(xla_flags: str) -> str:
  """`xla_flags` (an XLA_FLAGS value) with CHANNELS_LAST_FLAG added, unless it already names a layout."""
  if any(token.split("=")[0] in _LAYOUT_FLAGS for token in xla_flags.split()):
    return xla_flags
  return f"{xla_flags} {CHANNELS_LAST_FLAG}".strip()


def prefer_channels_last_convolutions(environ: MutableMapping[str, str] = os.environ) -> None:
  """Sets XLA_FLAGS in `environ` as `with_channels_last_convolutions` says. Call it before the first JAX
  computation of the process (importing jax is fine; XLA reads the flags when the backend starts)."""
  environ["XLA_FLAGS"] = with_channels_last_convolutions(environ.get("XLA_FLAGS", ""))
