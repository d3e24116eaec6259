"""Prediction over a cohort: images found from files, folders, globs or a BIDS tree; shards that partition it;
reruns that skip what is written; one bad image that fails alone."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from locnet_jax import io
from locnet_jax.eval import cohort, predict
from tests import helpers


def _touch(path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"x")
  return path


def test_images_come_from_files_folders_and_globs_once_each_in_order(tmp_path):
  b, a = _touch(tmp_path / "scans" / "b.nii.gz"), _touch(tmp_path / "scans" / "a.nii")
  _touch(tmp_path / "scans" / "notes.txt")
  c = _touch(tmp_path / "more" / "c.nii.gz")
  assert cohort.find_images([str(tmp_path / "scans")]) == [a, b]  # sorted by name, NIfTI only
  assert cohort.find_images([str(c), str(tmp_path / "scans" / "*.nii*"), str(b)]) == [c, a, b]  # once each
  for spec, problem in ((tmp_path / "nothing.nii.gz", "no such file"), (tmp_path / "x*.nii", "matches no file"),
                        (tmp_path / "more" / "..", "no .nii")):
    with pytest.raises(io.DataError, match=problem):
      cohort.find_images([str(spec)])
  with pytest.raises(io.DataError, match="no images given"):
    cohort.find_images(["", " "])
  with pytest.raises(io.DataError, match="case id 'b'"):  # two images, one name: outputs would collide
    cohort.plain_jobs([b, _touch(tmp_path / "other" / "b.nii.gz")], tmp_path / "out")


def test_a_bids_tree_gives_each_t1w_its_derivative_paths(tmp_path):
  bids = tmp_path / "bids"
  one = _touch(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
  two = _touch(bids / "sub-02" / "ses-pre" / "anat" / "sub-02_ses-pre_run-1_T1w.nii")
  _touch(bids / "sub-02" / "ses-pre" / "anat" / "sub-02_ses-pre_run-1_T1w.json")  # a sidecar, not an image
  _touch(bids / "sub-02" / "ses-pre" / "anat" / "sub-02_ses-pre_T2w.nii.gz")  # another contrast
  _touch(bids / "sub-03" / "func" / "sub-03_task-rest_bold.nii.gz")  # no T1w
  out = tmp_path / "out"
  jobs = cohort.bids_jobs(bids, out)
  assert [(j.image, j.case_id) for j in jobs] == [(one, "sub-01"), (two, "sub-02_ses-pre_run-1")]
  assert jobs[0].files == {kind: out / "sub-01" / "anat" / f"sub-01_desc-locnet_afids.{ext}"
                           for kind, ext in (("mrk", "mrk.json"), ("csv", "csv"), ("fcsv", "fcsv"))}
  assert jobs[1].files["fcsv"] == out / "sub-02" / "ses-pre" / "anat" / "sub-02_ses-pre_run-1_desc-locnet_afids.fcsv"
  assert [j.case_id for j in cohort.bids_jobs(bids, out, participant_labels=["sub-02"])] == ["sub-02_ses-pre_run-1"]
  assert [j.case_id for j in cohort.bids_jobs(bids, out, participant_labels=["01"])] == ["sub-01"]
  with pytest.raises(io.DataError, match="no subject sub-09"):
    cohort.bids_jobs(bids, out, participant_labels=["01", "09"])
  with pytest.raises(io.DataError, match="no T1w image"):
    cohort.bids_jobs(bids, out, participant_labels=["03"])
  with pytest.raises(io.DataError, match="no sub-"):
    cohort.bids_jobs(tmp_path, out)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shards_partition_a_cohort(tmp_path, count):
  jobs = cohort.plain_jobs([tmp_path / f"c{i}.nii.gz" for i in range(7)], tmp_path)
  parts = [cohort.shard(jobs, i, count) for i, _ in enumerate(range(count))]
  together = [job for part in parts for job in part]
  assert sorted(j.case_id for j in together) == sorted(j.case_id for j in jobs)  # every image exactly once
  assert len(together) == len(jobs)
  assert cohort.parse_shard(f"{count - 1}/{count}") == (count - 1, count)


@pytest.mark.parametrize("bad", ["4/4", "-1/4", "1", "a/b", "1/0"])
def test_a_bad_shard_is_refused(bad):
  with pytest.raises(io.DataError, match="not i/n"):
    cohort.parse_shard(bad)


def _corrupt(path: Path, source: Path) -> Path:
  path.write_bytes(source.read_bytes()[: len(source.read_bytes()) // 2])  # a truncated .nii.gz
  return path


@pytest.mark.slow  # reads the session's trained run (a train.py subprocess): the inner loop trains nothing
def test_a_cohort_skips_what_is_written_and_a_bad_image_fails_alone(tiny_run, tmp_path):
  workdir, manifest, _ = tiny_run
  images = [manifest.parent / f"c{i}.nii.gz" for i in range(3)]
  bad = _corrupt(tmp_path / "broken.nii.gz", images[0])
  out = tmp_path / "out"
  jobs = cohort.plain_jobs([images[0], bad, images[1]], out)
  seen = []
  first = predict.predict_jobs(workdir, jobs, out=out, num_samples=2, on_case=lambda *a: seen.append(a[:2]))
  assert [p["case_id"] for p in first.predicted] == ["c0", "c1"] and seen == [(1, 3), (2, 3), (3, 3)]
  assert first.failed == [(bad, first.failed[0][1])] and "cannot read the image" in first.failed[0][1]
  assert first.compile_s > 0 and all(p["load_s"] > 0 and p["write_s"] > 0 for p in first.predicted)
  rows = (out / "predictions.csv").read_text().splitlines()
  assert [r.split(",")[0] for r in rows[1:]] == ["c0", "c0", "c1", "c1"]  # the two done images, in order
  assert rows[0].endswith(",seconds") and all(float(r.split(",")[-1]) > 0 for r in rows[1:])
  assert not list(out.glob("broken*"))
  written = {p: p.stat().st_mtime_ns for p in out.iterdir()}
  # a rerun over a larger cohort predicts only the new image; the combined CSV then holds all three
  again = predict.predict_jobs(workdir, cohort.plain_jobs([*images, bad], out), out=out, num_samples=2)
  assert [p["case_id"] for p in again.predicted] == ["c2"] and [j.case_id for j in again.skipped] == ["c0", "c1"]
  assert all(p.stat().st_mtime_ns == t for p, t in written.items() if p.name != "predictions.csv")
  assert [r.split(",")[0] for r in (out / "predictions.csv").read_text().splitlines()[1:]] == ["c0"] * 2 + ["c1"] * 2 + ["c2"] * 2
  # a case's noise passes depend on its id only: predicted alone, c1 gives the same numbers
  alone = predict.predict_jobs(workdir, cohort.plain_jobs([images[1]], tmp_path / "alone"), out=tmp_path / "alone",
                               num_samples=2)
  np.testing.assert_allclose(alone.predicted[0]["mean_mm"], first.predicted[1]["mean_mm"], atol=1e-5)
  # reading the next image while the model runs (the default, above) changes nothing: read in turn, the
  # same cases, the same numbers, the same failure
  serial = predict.predict_jobs(workdir, cohort.plain_jobs([images[0], bad, images[1]], tmp_path / "serial"),
                                out=tmp_path / "serial", num_samples=2, prefetch=False)
  assert [p["case_id"] for p in serial.predicted] == ["c0", "c1"] and serial.failed == first.failed
  for a, b in zip(serial.predicted, first.predicted):
    np.testing.assert_array_equal(a["mean_mm"], b["mean_mm"])


@pytest.mark.slow  # predict.py subprocesses
def test_a_bids_tree_round_trips_into_derivatives_by_shard(tiny_run, tmp_path):
  workdir, manifest, _ = tiny_run
  bids = tmp_path / "bids"
  layout = {"sub-01/anat/sub-01_T1w.nii.gz": "c0", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz": "c1",
            "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz": "c2"}
  for name, case in layout.items():
    (bids / name).parent.mkdir(parents=True)
    (bids / name).write_bytes((manifest.parent / f"{case}.nii.gz").read_bytes())
  (bids / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
  out = bids / "derivatives" / "locnet"  # inside the BIDS tree, as the convention has it

  def run(*flags):
    return subprocess.run([sys.executable, "predict.py", f"--workdir={workdir}", f"--bids={bids}", f"--out={out}",
                           "--num_noise_samples=2", *flags], cwd=helpers.ROOT, capture_output=True, text=True,
                          timeout=600)

  shards = [run("--shard=0/2"), run("--shard=1/2")]
  assert [s.returncode for s in shards] == [0, 0], [s.stderr[-2000:] for s in shards]
  assert "2 of 2 images predicted" in shards[0].stdout and "1 of 1 images predicted" in shards[1].stdout
  assert sorted(p.name for p in out.glob("predictions_shard-*")) == ["predictions_shard-0of2.csv",
                                                                     "predictions_shard-1of2.csv"]
  for name in layout:
    stem = name.replace("_T1w.nii.gz", "_desc-locnet_afids")
    fcsv, mrk, table = (out / f"{stem}.{ext}" for ext in ("fcsv", "mrk.json", "csv"))
    from_csv = np.array([[float(v) for v in line.split(",")[2:5]] for line in table.read_text().splitlines()[1:]])
    np.testing.assert_allclose(io.load_landmarks(fcsv, ["A", "B"]), from_csv, atol=1e-6)
    np.testing.assert_allclose(io.load_landmarks(mrk, ["A", "B"]), from_csv, atol=1e-6)
  description = json.loads((out / "dataset_description.json").read_text())
  assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "locnet_jax"
  rerun = run("--participant_label=02")
  assert rerun.returncode == 0 and "0 of 2 images predicted, 2 skipped" in rerun.stdout, rerun.stdout + rerun.stderr
  (bids / "sub-03" / "anat").mkdir(parents=True)
  _corrupt(bids / "sub-03" / "anat" / "sub-03_T1w.nii.gz", manifest.parent / "c3.nii.gz")
  broken = run()
  errors = [line for line in broken.stderr.splitlines() if line.startswith("error: ")]
  assert broken.returncode == 1 and len(errors) == 1 and "sub-03_T1w.nii.gz" in errors[0], broken.stderr[-2000:]
  assert "Traceback" not in broken.stderr and not (out / "sub-03").exists()
