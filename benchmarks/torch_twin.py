"""The same multi-scale Loc-Net in PyTorch, checked against ours, and both timed side by side on the CPU.

    pip install torch==2.13.0          # the CPU wheel; never a dependency of the library
    python benchmarks/torch_twin.py --size demo --check-only    # equal outputs for equal weights
    python benchmarks/torch_twin.py --size demo                 # + forward, training step, 50-pass timings
    python benchmarks/torch_twin.py --size paper --device cuda --conv-impls xla --chunk 50   # both on a GPU

The twin copies our parameters (Flax kernels (kx, ky, kz, in, out) -> Conv3d (out, in, kx, ky, kz)) and
mirrors our layers: U-Net blocks conv -> instance norm (eps 1e-6, learned scale and bias) -> ReLU, 2x
max-pooling, nearest up-sampling, the decoder's first convolution as conv(up) + conv(skip); centre of mass
over ReLU weights; the crop as `grid_sample` (trilinear, border padding, align_corners=True: voxel
centres at integer indices, nearest edge value outside, like our `ops.crop_patch`); predictions passed
between scales in world mm through each level's affine; the 50 noise passes as one call with the coarse
scales once and the finest scale in chunks. Noise is drawn with JAX and handed to both, so the outputs
can be compared. Times: median of --repeats after --warmup, 2 threads for both (torch.set_num_threads,
XLA's CPU client uses the machine's cores). With --device cuda the twin runs on the GPU beside JAX (set
XLA_PYTHON_CLIENT_PREALLOCATE=false so that JAX leaves it memory), cuDNN's autotuning on, each timed call
ended with torch.cuda.synchronize; both frameworks use their default float32 convolution precision.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from locnet_jax import xla_env

xla_env.prefer_channels_last_convolutions()  # as train.py and evaluate.py do: GPU convolutions in NDHWC

NUM_SAMPLES = 50


class TwinUNet(torch.nn.Module):
  """Our `UNet3D` (norm instance|none, relu, max pooling, nearest up-sampling) in PyTorch, NCDHW."""

  def __init__(self, *, in_channels=1, out_channels, depth, base_channels, channel_growth=2.0, convs_per_level=2,
               norm="instance", kernel_size=3):
    super().__init__()
    self.depth, self.convs, self.norm = depth, convs_per_level, norm
    channels = [max(1, round(base_channels * channel_growth ** level)) for level in range(depth + 1)]
    self.layers = torch.nn.ModuleDict()

    def conv(name, cin, cout, bias=True, k=kernel_size):
      self.layers[name] = torch.nn.Conv3d(cin, cout, k, padding=k // 2, bias=bias)

    def norm_layer(name, c):
      if norm == "instance":
        self.layers[name] = torch.nn.GroupNorm(c, c, eps=1e-6)

    cin = in_channels
    for level in range(depth):
      for i in range(convs_per_level):
        conv(f"enc{level}_conv{i}", cin if i == 0 else channels[level], channels[level])
        norm_layer(f"enc{level}_norm{i}", channels[level])
      cin = channels[level]
    for i in range(convs_per_level):
      conv(f"bottom_conv{i}", cin if i == 0 else channels[depth], channels[depth])
      norm_layer(f"bottom_norm{i}", channels[depth])
    for level in reversed(range(depth)):
      conv(f"dec{level}_conv0", channels[level + 1], channels[level])
      conv(f"dec{level}_conv0_skip", channels[level], channels[level], bias=False)
      norm_layer(f"dec{level}_norm0", channels[level])
      for i in range(1, convs_per_level):
        conv(f"dec{level}_conv{i}", channels[level], channels[level])
        norm_layer(f"dec{level}_norm{i}", channels[level])
    conv("head", channels[0], out_channels, k=1)

  def _act_norm(self, x, name):
    if self.norm == "instance":
      x = self.layers[name](x)
    return F.relu(x)

  def _block(self, x, level, first=None):
    for i in range(self.convs):
      if i == 0 and first is not None:
        x = first + self.layers[f"{level}_conv0_skip"](x)
      else:
        x = self.layers[f"{level}_conv{i}"](x)
      x = self._act_norm(x, f"{level}_norm{i}")
    return x

  def forward(self, x):
    skips = []
    for level in range(self.depth):
      x = self._block(x, f"enc{level}")
      skips.append(x)
      x = F.max_pool3d(x, 2)
    x = self._block(x, "bottom")
    for level in reversed(range(self.depth)):
      x = F.interpolate(x, scale_factor=2, mode="nearest")
      first = self.layers[f"dec{level}_conv0"](x)
      x = self._block(skips[level], f"dec{level}", first=first)
    return self.layers["head"](x)

  def load_flax(self, params) -> None:
    """Copies a Flax `UNet3D` parameter dict into this module."""
    with torch.no_grad():
      for name, layer in self.layers.items():
        p = params[name]
        if isinstance(layer, torch.nn.Conv3d):
          layer.weight.copy_(torch.from_numpy(np.array(p["kernel"]).transpose(4, 3, 0, 1, 2).copy()))
          if layer.bias is not None:
            layer.bias.copy_(torch.from_numpy(np.array(p["bias"])))
        else:
          layer.weight.copy_(torch.from_numpy(np.array(p["scale"])))
          layer.bias.copy_(torch.from_numpy(np.array(p["bias"])))


def center_of_mass(h):
  """(N, X, Y, Z) heatmaps -> (N, 3) voxel coordinates: ReLU weights, softmax where all are zero."""
  n, shape = h.shape[0], h.shape[1:]
  grids = torch.meshgrid(*[torch.arange(s, dtype=h.dtype, device=h.device) for s in shape], indexing="ij")
  w = F.relu(h).reshape(n, -1)
  total = w.sum(-1, keepdim=True)
  soft = torch.softmax(h.reshape(n, -1), -1)
  w = torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), soft)
  return torch.stack([(w * g.reshape(1, -1)).sum(-1) for g in grids], -1)


def crop(volume, center_vox, patch):
  """volume (X, Y, Z), centres (M, 3) voxels -> (M, n, n, n) patches, trilinear, nearest edge outside."""
  size = torch.tensor(volume.shape, dtype=volume.dtype, device=volume.device)
  offsets = torch.arange(patch, dtype=volume.dtype, device=volume.device) - (patch - 1) / 2
  grid = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), -1)  # (n, n, n, 3) in (x, y, z)
  points = center_vox[:, None, None, None, :] + grid  # (M, n, n, n, 3) voxel (x, y, z)
  normalized = 2 * points / (size - 1) - 1
  m = center_vox.shape[0]
  source = volume[None, None].expand(m, 1, *volume.shape)  # (M, 1, D=X, H=Y, W=Z)
  out = F.grid_sample(source, normalized.flip(-1), mode="bilinear", padding_mode="border", align_corners=True)
  return out[:, 0]


def to_vox(points_mm, affine):
  inverse = torch.linalg.inv(affine)
  return points_mm @ inverse[:3, :3].T + inverse[:3, 3]


def to_mm(points_vox, affine):
  return points_vox @ affine[:3, :3].T + affine[:3, 3]


class TwinMultiScale(torch.nn.Module):
  """Our `MultiScaleLocNet` (batch 1 per call here) with per-landmark crops and channel routing."""

  def __init__(self, *, num_landmarks, num_scales, patch, unet):
    super().__init__()
    self.k, self.patch = num_landmarks, patch
    self.nets = torch.nn.ModuleList([TwinUNet(out_channels=num_landmarks, **unet) for _ in range(num_scales)])

  def load_flax(self, params) -> None:
    for s, net in enumerate(self.nets):
      net.load_flax(params[f"scale{s}"]["unet"])

  def refine(self, s, volume, affine, center_mm):
    """center_mm (M*K, 3) -> predictions (M*K, 3) mm, landmark k of each group read from channel k."""
    center_vox = to_vox(center_mm, affine)
    patches = crop(volume, center_vox, self.patch)
    heat = self.nets[s](patches[:, None])  # (M*K, K, n, n, n)
    rows = torch.arange(center_mm.shape[0], device=center_mm.device)
    heat = heat[rows, rows % self.k]
    vox = center_vox + center_of_mass(heat) - (self.patch - 1) / 2
    return to_mm(vox, affine)

  def forward(self, volumes, affines, noise_mm=None):
    """volumes: S tensors (X, Y, Z); affines: S (4, 4); noise_mm (K, 3) or None -> (S, K, 3) mm."""
    heat = self.nets[0](volumes[0][None, None])[0]  # (K, X, Y, Z)
    preds = [to_mm(center_of_mass(heat), affines[0])]
    for s in range(1, len(self.nets)):
      center = preds[-1]
      if s == len(self.nets) - 1 and noise_mm is not None:
        center = center + noise_mm
      preds.append(self.refine(s, volumes[s], affines[s], center))
    return torch.stack(preds)

  def uncertainty(self, volumes, affines, noise_mm, chunk):
    """noise_mm (N, K, 3): the coarse scales once, the finest for all N shifts, `chunk` at a time."""
    with torch.no_grad():
      heat = self.nets[0](volumes[0][None, None])[0]
      center = to_mm(center_of_mass(heat), affines[0])
      for s in range(1, len(self.nets) - 1):
        center = self.refine(s, volumes[s], affines[s], center)
      out = []
      for start in range(0, noise_mm.shape[0], chunk):
        shifted = (center[None] + noise_mm[start:start + chunk]).reshape(-1, 3)
        out.append(self.refine(len(self.nets) - 1, volumes[-1], affines[-1], shifted).reshape(-1, self.k, 3))
      return torch.cat(out)


def main() -> None:
  import jax
  import model_cost
  from timing import timed

  from locnet_jax.model import inference, losses
  from locnet_jax.model.locnet import MultiScaleLocNet
  from locnet_jax.train import steps

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=("demo", "paper", "paper6"), default="demo")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--chunk", type=int, default=10)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--device", default="cpu", help="PyTorch device: cpu, or cuda beside JAX on a GPU")
  parser.add_argument("--check-only", action="store_true")
  parser.add_argument("--conv-impls", default="as_2d,xla",
                      help="JAX convolution implementations to compare (locnet_jax.unet.CONV_IMPLS), comma-separated")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  spec = model_cost.SIZES[args.size]
  volumes, affines, target = model_cost._inputs(spec)
  num_scales, k = len(spec["spacings"]), spec["num_landmarks"]
  impls = [i for i in args.conv_impls.split(",") if i]
  models = {impl: MultiScaleLocNet(k, num_scales=num_scales, patch_shape=(spec["patch"],) * 3,
                                   unet=dict(spec["unet"], norm="instance", conv_impl=impl)) for impl in impls}
  model = models[impls[0]]
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=volumes, affines=affines,
                                      learning_rate=5e-4)
  twin = TwinMultiScale(num_landmarks=k, num_scales=num_scales, patch=spec["patch"],
                        unet=dict(depth=spec["unet"]["depth"], base_channels=spec["unet"]["base_channels"]))
  twin.load_flax(jax.device_get(state.params))
  device = torch.device(args.device)
  twin.to(device)
  torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest kernels (as XLA autotunes on GPUs)

  def to_torch(x):
    return torch.from_numpy(np.array(x)).to(device)
  t_volumes = [to_torch(v[0]) for v in volumes]
  t_affines = [to_torch(a[0]) for a in affines]

  # equal outputs for equal weights: deterministic, then with the same noise, for every JAX convolution
  key = jax.random.key(1)
  noise = np.array(jax.random.uniform(key, (1, k, 3), minval=-5.0, maxval=5.0))
  with torch.no_grad():
    theirs = twin(t_volumes, t_affines).cpu().numpy()
    theirs_noisy = twin(t_volumes, t_affines, to_torch(noise[0])).cpu().numpy()
  worst = 0.0
  for impl, m in models.items():
    ours = np.asarray(m.apply({"params": state.params}, volumes, affines)["pred_mm"][0])
    ours_noisy = np.asarray(m.apply({"params": state.params}, volumes, affines, noise_key=key)["pred_mm"][0])
    diff, diff_noisy = np.abs(ours - theirs).max(), np.abs(ours_noisy - theirs_noisy).max()
    worst = max(worst, diff, diff_noisy)
    print(f"size={args.size} {spec}; conv {impl}: max |JAX - PyTorch| prediction difference: {diff:.2e} mm "
          f"without noise, {diff_noisy:.2e} mm with the same noise")
  if args.check_only:
    sys.exit(0 if worst < 1e-2 else 1)

  weights = losses.loss_weights(250, num_epochs=500, num_scales=num_scales)
  batch = {"volumes": volumes, "affines": affines, "target_mm": target}
  optimizer = torch.optim.Adam(twin.parameters(), lr=5e-4)
  t_target, t_weights = to_torch(target[0]), to_torch(weights)
  t_noise = to_torch(jax.random.uniform(key, (NUM_SAMPLES, k, 3), minval=-5.0, maxval=5.0))

  def synced(fn):  # CUDA runs asynchronously: a timed call ends when the device is done
    return (lambda: (fn(), torch.cuda.synchronize())) if device.type == "cuda" else fn

  def torch_step():
    optimizer.zero_grad()
    pred = twin(t_volumes, t_affines, to_torch(noise[0]))
    loss = (t_weights * ((pred - t_target[None]) ** 2).sum(-1).mean(-1)).sum()
    loss.backward()
    optimizer.step()

  def jax_workloads(m):
    predict = jax.jit(lambda p, v, a, kk: m.apply({"params": p}, v, a, noise_key=kk)["pred_mm"])
    step = jax.jit(lambda s, kk: steps.train_step(s, batch, kk, weights=weights))
    sample = inference.make_uncertainty(m, num_samples=NUM_SAMPLES, chunk_size=args.chunk)
    holder = {"state": state.replace(apply_fn=m.apply)}

    def jax_step():
      holder["state"], metrics = step(holder["state"], key)
      jax.block_until_ready(metrics)
    return (lambda: jax.block_until_ready(predict(state.params, volumes, affines, key)), jax_step,
            lambda: jax.block_until_ready(sample(state.params, volumes, affines, key)))

  names = ("forward", "training step", f"{NUM_SAMPLES}-pass uncertainty (chunks of {args.chunk})")
  measured = {impl: [timed(fn, args.warmup, args.repeats) for fn in jax_workloads(m)] for impl, m in models.items()}
  measured["torch"] = [timed(synced(fn), args.warmup, args.repeats) for fn in (
      lambda: _no_grad(twin, t_volumes, t_affines, to_torch(noise[0])), torch_step,
      lambda: twin.uncertainty(t_volumes, t_affines, t_noise, args.chunk))]
  where = (f"{torch.cuda.get_device_name(device)} ({jax.devices()[0].device_kind} for JAX)" if device.type == "cuda"
           else f"CPU, {args.threads} threads")
  print(f"{where}; jax {jax.__version__}, torch {torch.__version__}; median of {args.repeats} "
        f"after {args.warmup} warm-up, seconds (min-max)")
  print("| workload | " + " | ".join(f"JAX conv={i}" for i in impls) + " | PyTorch | " +
        " | ".join(f"JAX {i} / PyTorch" for i in impls) + " |")
  print("|---" * (2 * len(impls) + 2) + "|")
  for w, name in enumerate(names):
    cells = [f"{measured[i][w][0]:.3f} ({measured[i][w][1]:.3f}-{measured[i][w][2]:.3f})" for i in [*impls, "torch"]]
    ratios = [f"{measured[i][w][0] / measured['torch'][w][0]:.2f}" for i in impls]
    print(f"| {name} | " + " | ".join(cells + ratios) + " |")


def _no_grad(twin, volumes, affines, noise):
  with torch.no_grad():
    return twin(volumes, affines, noise)


if __name__ == "__main__":
  main()
