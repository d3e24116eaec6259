"""Training-time augmentation of a pyramid and its landmarks, together, deterministic from a NumPy RNG.

A random world transform T (rotation about the grid centre, isotropic and per-axis scale, translation),
optionally followed by a smooth displacement d (the mild `elastic_mm` field, or the inter-subject-sized
`deform_mm` one of `variation`), moves the image content: every level is resampled so that the new image
at world point p is the old one at inv(T)(p + d(p)), on the same grid (same affines), and the landmarks
move to where that map sends them. Then the contrast changes (`variation`: a random intensity lookup
table, a bias field, blur, thick slices), then gamma, scale, shift and noise, drawn once per case and
applied to every level alike (the noise per level); last, an optional random field of view zeroes the
image outside a box, and the landmarks outside it (or outside the grid) are marked absent. With
`finest_margin_mm` the finest level, most of the work (8x the next level's voxels), is computed only in a
box around the moved landmarks (`finest_region`): the finer scales crop patches around the landmarks, so
what lies farther away is never read once the coarser scales have converged. With a marked
outside (`outside_value` < 0) the image's inside mask moves with it, and the marker fills the rest. A landmark cut
away by the field of view but still on the grid keeps its position as a target: the model learns where
it lies beyond the image's edge, which is how presence is read at prediction time (`eval/qc.py`).
The caller seeds the RNG with ``(seed, epoch, case_index)``, so a resumed run replays exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage
from scipy.spatial.transform import Rotation

from locnet_jax import geometry
from locnet_jax.data import preprocess, variation
from locnet_jax.data.preprocess import Pyramid


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  max_rotation_deg: float = 10.0  # uniform per axis
  max_scale: float = 0.05  # isotropic factor in [1 - s, 1 + s]
  max_translation_mm: float = 10.0  # uniform per axis
  max_gamma: float = 0.2  # intensity ** exp(U(-g, g)), on [0, 1]-normalised images
  max_intensity_scale: float = 0.1  # * U(1 - s, 1 + s)
  max_intensity_shift: float = 0.05  # + U(-s, s)
  noise_std: float = 0.01  # Gaussian noise std
  elastic_mm: float = 0.0  # > 0: a smooth random displacement of up to this many mm (slower)
  # anatomy (variation): inter-subject-sized deformation and brain size
  deform_mm: float = 0.0  # > 0: displacement up to this many mm (capped fold-free by the node spacing)
  deform_spacing_mm: tuple[float, float] = (20.0, 60.0)  # the deformation's wavelength, uniform per case
  max_axis_scale: float = 0.0  # per-axis factor in [1 - s, 1 + s], on top of the isotropic one
  # contrast (variation)
  lut_probability: float = 0.0  # chance of a random intensity lookup table (tissue brightness reordered)
  lut_knots: int = 8
  max_bias_log: float = 0.0  # multiplicative bias field exp(U(-b, b)), smooth
  max_blur_mm: float = 0.0  # Gaussian blur std U(0, b) mm
  thick_probability: float = 0.0  # chance of thick slices along one random axis
  max_thickness_mm: float = 6.0  # their thickness U(2, t) mm
  # field of view (variation): a box outside which the image is zero and the landmarks absent
  fov_probability: float = 0.0
  fov_slab_probability: float = 0.5  # a slab along one axis, else a partial volume
  fov_min_mm: float = 40.0
  fov_shift_mm: float = 40.0  # extra translation per axis when cropping: which part of the head is seen
  # the pyramid's value outside the image (the data recipe's, `preprocess.split_outside`): 0, or < 0 to mark
  # it, kept outside the moved image and the field of view, never changed by the intensity draws
  outside_value: float = 0.0
  # > 0: the finest level is computed only within this many mm of the moved landmarks' bounding box, and
  # is `outside_value` beyond it (`finest_region`): its crops read nothing else while the next-coarser
  # scale is within (margin - patch half-width - noise) mm of each landmark. 0: the whole grid.
  finest_margin_mm: float = 0.0


DEVICE_FIELDS = ("max_rotation_deg", "max_scale", "max_translation_mm", "max_gamma", "max_intensity_scale",
                 "max_intensity_shift", "noise_std", "deform_mm", "deform_spacing_mm", "max_axis_scale",
                 "lut_probability", "lut_knots", "max_bias_log", "max_blur_mm", "thick_probability",
                 "max_thickness_mm", "fov_probability", "fov_slab_probability", "fov_min_mm",
                 "fov_shift_mm", "outside_value")  # what `augment_device` implements; the rest (elastic_mm) is host-only
SPEED_FIELDS = ("finest_margin_mm",)  # the host's shortcuts: the device computes the whole grid instead


def host_only_fields(settings: AugmentSettings) -> list[str]:
  """The fields of `settings` set away from their defaults that only the host augmentation implements."""
  default = AugmentSettings()
  return [f.name for f in dataclasses.fields(settings)
          if f.name not in DEVICE_FIELDS + SPEED_FIELDS and getattr(settings, f.name) != getattr(default, f.name)]


@dataclasses.dataclass(frozen=True)
class Augmented:
  """An augmented case: the pyramid, landmarks (K, 3) RAS mm (NaN if missing or moved off the grid; a
  landmark cut away by the field of view keeps its position), presence (K,) (1 in the image, 0 absent:
  cut away by the field of view or moved off the grid, NaN unannotated), and the world transform (4, 4)."""

  pyramid: Pyramid
  target_mm: np.ndarray
  present: np.ndarray
  transform: np.ndarray


def random_transform(rng: np.random.Generator, settings: AugmentSettings, center_mm) -> np.ndarray:
  """World->world (4, 4): rotate and scale about `center_mm`, then translate."""
  linear = Rotation.from_euler("xyz", rng.uniform(-1, 1, 3) * settings.max_rotation_deg, degrees=True).as_matrix()
  linear = linear * rng.uniform(1 - settings.max_scale, 1 + settings.max_scale)
  if settings.max_axis_scale:  # drawn only when on: the stream of the settings without it is unchanged
    linear = linear @ np.diag(rng.uniform(1 - settings.max_axis_scale, 1 + settings.max_axis_scale, 3))
  center = np.asarray(center_mm, np.float64)
  transform = np.eye(4)
  transform[:3, :3] = linear
  transform[:3, 3] = center - linear @ center + rng.uniform(-1, 1, 3) * settings.max_translation_mm
  return transform


class ElasticField:
  """A smooth random displacement field (RAS mm) on a coarse grid over a world box, trilinear in between."""

  def __init__(self, rng: np.random.Generator, *, lower_mm, upper_mm, max_mm: float = 3.0, nodes: int = 5):
    self.lower = np.asarray(lower_mm, np.float64)
    self.step = (np.asarray(upper_mm, np.float64) - self.lower) / (nodes - 1)
    self.values = rng.uniform(-max_mm, max_mm, (3, nodes, nodes, nodes))

  def __call__(self, points_mm: np.ndarray) -> np.ndarray:
    grid = ((points_mm - self.lower) / self.step).T
    return np.stack([scipy.ndimage.map_coordinates(v, grid, order=1, mode="nearest") for v in self.values], -1)

  @classmethod
  def over_grid(cls, rng, affine, shape, *, max_mm: float) -> "ElasticField":
    corners = geometry.vox_to_mm(np.array([[0, 0, 0], np.asarray(shape) - 1], np.float64), affine)
    return cls(rng, lower_mm=corners.min(0), upper_mm=corners.max(0), max_mm=max_mm)


def source_points(transform: np.ndarray, elastic=None):
  """The world map of a warp: the moved image at p is the original at inv(transform)(p + elastic(p))."""
  inverse = np.linalg.inv(transform)
  if elastic is None:
    return lambda p: geometry.apply_affine(inverse, p)
  return lambda p: geometry.apply_affine(inverse, p + elastic(p))


def move_points(points_mm: np.ndarray, *, transform: np.ndarray, elastic=None, iterations: int = 20) -> np.ndarray:
  """Where points (K, 3) land under the warp of `source_points`: solves inv(transform)(p + elastic(p)) =
  point by fixed-point iteration (the field is small and smooth). NaN rows stay NaN."""
  moved = geometry.apply_affine(transform, points_mm)
  if elastic is None:
    return moved
  ok = np.all(np.isfinite(moved), axis=-1)
  p = moved.copy()
  for _ in range(iterations):
    p[ok] = moved[ok] - elastic(p[ok])
  return p


def transform_volume(volume: np.ndarray, affine: np.ndarray, transform: np.ndarray, *,
                     out_grid=None) -> np.ndarray:
  """The image moved by the world transform `transform`, on its own grid or on `out_grid` ((affine,
  shape), e.g. a box of it: `finest_region`), 0 outside the old image."""
  out_affine, out_shape = out_grid if out_grid is not None else (affine, volume.shape)
  vox_map = np.linalg.inv(affine) @ np.linalg.inv(transform) @ out_affine  # new voxel -> old voxel
  return scipy.ndimage.affine_transform(np.asarray(volume, np.float32), vox_map[:3, :3], offset=vox_map[:3, 3],
                                        output_shape=tuple(out_shape), order=1, mode="constant", cval=0.0,
                                        prefilter=False)


def warp_volume(volume: np.ndarray, affine: np.ndarray, transform: np.ndarray, field: variation.DisplacementField,
                *, slab: int = 32, out_grid=None) -> np.ndarray:
  """The image under the warp of `source_points(transform, field)`, on its own grid or on `out_grid`
  ((affine, shape)), 0 outside the old image: `preprocess.resample` with that world map, the field
  evaluated separably (`on_grid`), in slabs of the first axis (memory bounded at 448^3)."""
  volume = np.asarray(volume, np.float32)
  out_affine, out_shape = out_grid if out_grid is not None else (affine, volume.shape)
  to_source = np.linalg.inv(affine) @ np.linalg.inv(transform)  # world mm -> old voxel
  vox_map = to_source @ out_affine  # new voxel -> old voxel, before the field
  x, y, z = (np.arange(n, dtype=np.float64) for n in out_shape)
  out = np.empty(tuple(out_shape), np.float32)
  for x0 in range(0, out_shape[0], slab):
    rows = slice(x0, min(x0 + slab, out_shape[0]))
    displacement = field.on_grid(out_affine, out_shape, rows)  # (x', Y, Z, 3) mm
    source = displacement @ to_source[:3, :3].T  # (x', Y, Z, 3) old voxels
    source += (x[rows, None, None, None] * vox_map[:3, 0] + y[None, :, None, None] * vox_map[:3, 1]
               + z[None, None, :, None] * vox_map[:3, 2] + vox_map[:3, 3])
    out[rows] = scipy.ndimage.map_coordinates(volume, np.moveaxis(source, -1, 0), order=1, mode="constant",
                                              cval=0.0, prefilter=False)
  return out


def augment(pyramid: Pyramid, target_mm: np.ndarray, rng: np.random.Generator,
            settings: AugmentSettings) -> tuple[Pyramid, np.ndarray, np.ndarray]:
  """Returns (augmented pyramid, moved landmarks (K, 3) RAS mm, the world transform (4, 4)); see
  `augment_case` (landmarks moved off the grid are NaN here)."""
  out = augment_case(pyramid, target_mm, rng, settings)
  return out.pyramid, out.target_mm, out.transform


def _contrast(rng: np.random.Generator, settings: AugmentSettings, box) -> dict:
  """The case's contrast draws (one for every level)."""
  draws = {"lut": None, "bias": None, "blur_mm": 0.0, "thick": None}
  if settings.lut_probability and rng.uniform() < settings.lut_probability:
    draws["lut"] = variation.random_lut(rng, knots=settings.lut_knots)
  if settings.max_bias_log:
    draws["bias"] = variation.smooth_log_field(rng, lower_mm=box[0], upper_mm=box[1], max_log=settings.max_bias_log)
  if settings.max_blur_mm:
    draws["blur_mm"] = rng.uniform(0.0, settings.max_blur_mm)
  if settings.thick_probability and rng.uniform() < settings.thick_probability:
    draws["thick"] = (int(rng.integers(3)), rng.uniform(2.0, settings.max_thickness_mm))
  return draws


def _apply_contrast(volume: np.ndarray, affine: np.ndarray, draws: dict) -> np.ndarray:
  if draws["lut"] is not None:
    volume = variation.apply_lut(volume, draws["lut"])
  if draws["bias"] is not None:
    volume = volume * np.exp(draws["bias"].on_grid(affine, volume.shape)[..., 0])
  volume = variation.blur(volume, affine, draws["blur_mm"])
  if draws["thick"] is not None:
    volume = variation.thick_slices(volume, affine, axis=draws["thick"][0], thickness_mm=draws["thick"][1])
  return volume


def _move(volume: np.ndarray, affine: np.ndarray, transform: np.ndarray, field, out_grid) -> np.ndarray:
  """One level under the case's world transform and displacement (none, elastic or `DisplacementField`),
  on `out_grid` (affine, shape)."""
  if field is None:
    return transform_volume(volume, affine, transform, out_grid=out_grid)
  if isinstance(field, variation.DisplacementField):
    return warp_volume(volume, affine, transform, field, out_grid=out_grid)
  return preprocess.resample(volume, affine, target_affine=out_grid[0], target_shape=out_grid[1],
                             world_map=source_points(transform, field))


def finest_region(affine: np.ndarray, shape, points_mm: np.ndarray, *, margin_mm: float) -> tuple[slice, ...] | None:
  """The voxel box (3 slices) of a grid (voxel->RAS `affine`, `shape`) within `margin_mm` of the bounding
  box of `points_mm` (K, 3) RAS mm (NaN rows ignored), clipped to the grid; None (the whole grid) when
  `margin_mm` <= 0 or no point is finite."""
  points = np.asarray(points_mm, np.float64)
  points = points[np.all(np.isfinite(points), axis=-1)]
  if margin_mm <= 0 or len(points) == 0:
    return None
  lower, upper = points.min(0) - margin_mm, points.max(0) + margin_mm
  corners = np.array(np.meshgrid(*zip(lower, upper), indexing="ij")).reshape(3, -1).T
  vox = geometry.mm_to_vox(corners, affine)
  first = np.clip(np.floor(vox.min(0)).astype(int), 0, np.asarray(shape) - 1)
  last = np.clip(np.ceil(vox.max(0)).astype(int), 0, np.asarray(shape) - 1)
  return tuple(slice(int(a), int(b) + 1) for a, b in zip(first, last))


def _sub_grid(affine: np.ndarray, shape, box) -> tuple[np.ndarray, tuple[int, ...]]:
  """(affine, shape) of the voxel box `box` (slices, or None: the whole grid) of a grid."""
  if box is None:
    return np.asarray(affine, np.float64), tuple(shape)
  start = np.eye(4)
  start[:3, 3] = [b.start for b in box]
  return np.asarray(affine, np.float64) @ start, tuple(b.stop - b.start for b in box)


def augment_case(pyramid: Pyramid, target_mm: np.ndarray, rng: np.random.Generator,
                 settings: AugmentSettings) -> Augmented:
  """The case under one draw of `settings` (module docstring): image and landmarks moved together."""
  fine = pyramid.affines[-1]
  shape = pyramid.volumes[-1].shape
  center = geometry.vox_to_mm((np.asarray(shape, np.float64) - 1) / 2, fine)
  box = variation.grid_box_mm(fine, shape)
  transform = random_transform(rng, settings, center)
  gamma = np.exp(rng.uniform(-settings.max_gamma, settings.max_gamma))
  scale = rng.uniform(1 - settings.max_intensity_scale, 1 + settings.max_intensity_scale)
  shift = rng.uniform(-settings.max_intensity_shift, settings.max_intensity_shift)
  field = (ElasticField.over_grid(rng, fine, shape, max_mm=settings.elastic_mm)
           if settings.elastic_mm > 0 else None)
  if settings.deform_mm > 0:
    spacing = rng.uniform(*settings.deform_spacing_mm)
    field = variation.random_displacement(rng, lower_mm=box[0], upper_mm=box[1], spacing_mm=spacing,
                                          max_mm=settings.deform_mm)
  fov = None
  if settings.fov_probability and rng.uniform() < settings.fov_probability:
    transform[:3, 3] += rng.uniform(-1, 1, 3) * settings.fov_shift_mm
    fov = variation.random_field_of_view(rng, center_mm=center, extent_mm=box[1] - box[0],
                                         min_mm=settings.fov_min_mm, slab_probability=settings.fov_slab_probability)
  contrast = _contrast(rng, settings, box)
  moved_target = move_points(target_mm, transform=transform, elastic=field)
  volumes = []
  for s, (level, affine) in enumerate(zip(pyramid.volumes, pyramid.affines)):
    region = (finest_region(affine, level.shape, moved_target, margin_mm=settings.finest_margin_mm)
              if s == len(pyramid.volumes) - 1 else None)
    out_affine, out_shape = _sub_grid(affine, level.shape, region)
    volume, image_mask = preprocess.split_outside(level, outside_value=settings.outside_value)
    moved = _move(volume, affine, transform, field, (out_affine, out_shape))
    moved = _apply_contrast(moved, out_affine, contrast)
    moved = np.clip(moved, 0, None) ** gamma * scale + shift
    if settings.noise_std:
      moved = moved + rng.normal(0.0, settings.noise_std, moved.shape)
    keep = None if image_mask is None else _move(image_mask, affine, transform, field, (out_affine, out_shape)) > 0.5
    if fov is not None:
      keep = fov.mask(out_affine, moved.shape) & (True if keep is None else keep)
    if keep is not None:
      moved = np.where(keep, moved, settings.outside_value)
    if region is not None:
      moved, inner = np.full(level.shape, settings.outside_value, np.float32), moved
      moved[region] = inner
    volumes.append(moved.astype(np.float32))
  annotated = np.all(np.isfinite(moved_target), axis=-1)
  on_grid = variation.FieldOfView(*box).contains(moved_target)
  inside = on_grid if fov is None else on_grid & fov.contains(moved_target)
  present = np.where(annotated, inside.astype(np.float64), np.nan)
  moved_target = np.where(on_grid[:, None], moved_target, np.nan)
  return Augmented(Pyramid(tuple(volumes), pyramid.affines), moved_target, present, transform)
