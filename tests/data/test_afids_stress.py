"""The stress sets: another contrast, another shape, thick slices and partial fields of view, each a data set
that loads like the benchmark, with the landmarks where the image has them and absent ones listed."""

import json

import numpy as np
import pytest

from locnet_jax import dataset, geometry, io
from locnet_jax.data import afids, afids_stress, loader

pytestmark = pytest.mark.xdist_group("afids_stress")  # one worker builds the sets once

LANDMARKS = ("AC", "PC", "GENU", "SPLE", "RLVAC", "LOSF")
SETTINGS = loader.PreprocessSettings(spacings_mm=(8.0, 4.0), finest_size=32, intensity="mr")


@pytest.fixture(scope="module")
def built(tmp_path_factory, afids_source):
  out = tmp_path_factory.mktemp("stress")
  paths = afids_stress.build_stress(out, num_cases=2, seed=7, landmarks=LANDMARKS, source=afids_source,
                                    log=lambda *_: None)
  return out, paths


def _cases(paths, kind):
  manifest = dataset.load_manifest(paths[kind])
  info = json.loads((paths[kind].parent / "build_info.json").read_text())["cases"]
  return manifest, manifest.split("test"), info


@pytest.mark.slow  # builds the stress sets from the template: over 45 s on 2 cores
@pytest.mark.parametrize("kind", afids_stress.KINDS)
def test_every_kind_is_a_data_set_whose_landmarks_lie_in_their_images(built, kind):
  _, paths = built
  manifest, cases, info = _cases(paths, kind)
  assert manifest.landmarks == LANDMARKS and len(cases) == 2
  for case in cases:  # load_example checks every annotated landmark lies inside its image
    example = loader.load_example(case, manifest.landmarks, SETTINGS, None)
    assert example.pyramid.volumes[-1].shape == (32, 32, 32)


@pytest.mark.slow  # the built stress sets (see above)
def test_thick_cases_have_thick_slices_along_one_axis(built):
  _, paths = built
  _, cases, info = _cases(paths, "thick")
  for case, record in zip(cases, info):
    spacing = io.load_volume(case.image).spacing_mm
    np.testing.assert_allclose(np.sort(spacing), [1.0, 1.0, afids_stress.THICK_MM], atol=1e-4)


@pytest.mark.slow  # the built stress sets (see above)
def test_slab_cases_cover_a_slab_and_list_the_landmarks_outside_it_as_absent(built):
  _, paths = built
  manifest, cases, info = _cases(paths, "slab")
  saw_absent = False
  for case, record in zip(cases, info):
    volume = io.load_volume(case.image)
    axis = "RAS".index(record["slab_mm"]["world_axis"])
    corners = geometry.vox_to_mm(np.array([[0, 0, 0], np.asarray(volume.data.shape) - 1], float), volume.affine)
    extent = np.ptp(corners[:, axis])
    assert extent <= afids_stress.SLAB_MM[1] + 1e-6 and np.ptp(corners, axis=0).max() > 150  # thin one way only
    points = io.load_landmarks(case.landmarks, manifest.landmarks)
    missing = [n for n, p in zip(manifest.landmarks, points) if np.any(np.isnan(p))]
    assert missing == record["absent"]
    saw_absent |= bool(missing)
    # where the whole case has each landmark (the consensus moved by the case's transform): outside the
    # slab for the absent ones, inside for the others
    consensus = afids.parse_afids((afids.RESOURCES / afids.FILES["afids"][0]).read_bytes())
    whole = geometry.apply_affine(np.asarray(record["transform_world"]),
                                  consensus[[afids.AFID_NAMES.index(n) for n in manifest.landmarks]])
    low, high = corners[:, axis].min(), corners[:, axis].max()
    outside = (whole[:, axis] < low - 1e-3) | (whole[:, axis] > high + 1e-3)
    assert [n for n, o in zip(manifest.landmarks, outside) if o] == record["absent"]
    np.testing.assert_allclose(points[~outside], whole[~outside], atol=1e-3)
  assert saw_absent  # seed 7's slabs do cut landmarks away (a slab 30-60 mm thick around one of six)


def test_thick_slices_keep_the_world_of_each_slice_centre():
  data = np.arange(4 * 10 * 3, dtype=np.float32).reshape(4, 10, 3)
  affine = np.diag([1.0, 1.0, 1.0, 1.0])
  affine[:3, 3] = [5.0, -3.0, 2.0]
  thick, new_affine = afids_stress.thick_slices(data, affine, axis=1, thickness_mm=5.0)
  assert thick.shape == (4, 2, 3)
  np.testing.assert_allclose(thick[:, 0], data[:, 0:5].mean(axis=1))  # the box average of slice 0
  np.testing.assert_allclose(geometry.vox_to_mm(np.array([0.0, 1.0, 0.0]), new_affine), [5.0, -3.0 + 7.0, 2.0])


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="unknown stress kinds"):
    afids_stress.build_stress(tmp_path, kinds=("t3w",))
  with pytest.raises(ValueError, match="num_cases"):
    afids_stress.build_stress(tmp_path, num_cases=0)
  assert afids_stress.main(["--out", str(tmp_path), "--kinds", "nope"]) == 2
