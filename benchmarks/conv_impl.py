"""One 3x3x3 convolution layer, three ways, on the CPU: lax's 3-D convolution, ours as 2-D slices
(`ops.conv3d_as_2d`), and PyTorch's Conv3d (oneDNN) when torch is installed.

    python benchmarks/conv_impl.py            # the layer shapes of the demo and paper-size U-Nets

Forward and forward+backward (the vector-Jacobian product for input and kernel) per layer shape; median of
--repeats after a warm-up, block_until_ready; GFLOP/s counts 2*N*X*Y*Z*27*C_in*C_out per forward (x3 with
the backward). This is the measurement behind `locnet_jax.unet.CONV_IMPLS`' "auto" choice on CPUs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed

# (batch, edge, C_in, C_out): the demo U-Net (24^3 patches, 8 base channels, 6 landmarks) and the paper's
# (56^3 patches, 16 base channels, 2 landmarks), one layer per level
SHAPES = ((6, 24, 8, 8), (6, 12, 16, 16), (6, 6, 32, 32), (2, 56, 1, 16), (2, 56, 16, 16), (2, 28, 32, 32),
          (2, 14, 64, 64))


def main() -> None:
  import jax

  from locnet_jax.model import ops

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
  args = parser.parse_args()
  try:
    import torch
    torch.set_num_threads(args.threads)
  except ImportError:
    torch = None

  def lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

  impls = {"xla 3-D": lax_conv, "as 2-D slices": ops.conv3d_as_2d}
  print(f"CPU, jax {jax.__version__}" + (f", torch {torch.__version__} ({args.threads} threads)" if torch else "")
        + f"; median of {args.repeats}; ms (GFLOP/s)")
  header = ["layer N, edge, C_in->C_out", *[f"{n} fwd" for n in impls], *[f"{n} fwd+bwd" for n in impls]]
  if torch:
    header += ["torch fwd", "torch fwd+bwd"]
  print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
  for n, edge, c_in, c_out in SHAPES:
    x = jax.random.normal(jax.random.key(0), (n, edge, edge, edge, c_in))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, c_in, c_out)) * 0.1
    g = jax.random.normal(jax.random.key(2), (n, edge, edge, edge, c_out))
    gflop = 2 * n * edge ** 3 * 27 * c_in * c_out / 1e9
    cell = lambda t, k=1: f"{1e3 * t[0]:.1f} ({k * gflop / t[0]:.0f})"  # (median, min, max) s  # noqa: E731
    fwd, bwd = [], []
    want = lax_conv(x, w)
    for f in impls.values():
      np.testing.assert_allclose(f(x, w), want, atol=1e-3, rtol=1e-4)  # the same function
      jf = jax.jit(f)
      vjp = jax.jit(lambda x, w, g, f=f: (lambda y, back: (y, back(g)))(*jax.vjp(f, x, w)))  # output + both grads
      fwd.append(cell(timed(lambda: jf(x, w).block_until_ready(), args.warmup, args.repeats)))
      bwd.append(cell(timed(lambda: jax.block_until_ready(vjp(x, w, g)), args.warmup, args.repeats), 3))
    row = [f"{n}, {edge}, {c_in}->{c_out}", *fwd, *bwd]
    if torch:
      conv = torch.nn.Conv3d(c_in, c_out, 3, padding=1)
      tx = torch.randn(n, c_in, edge, edge, edge).contiguous(memory_format=torch.channels_last_3d)
      with torch.no_grad():
        row.append(cell(timed(lambda: conv(tx), args.warmup, args.repeats)))
      tx.requires_grad_(True)
      tg = torch.randn(n, c_out, edge, edge, edge)
      row.append(cell(timed(lambda: torch.autograd.grad(conv(tx), (tx, conv.weight), tg), args.warmup,
                              args.repeats), 3))
    print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
  main()
