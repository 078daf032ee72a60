"""Preparation end to end on the real clips in ../shared/data; TFDS without TensorFlow; resume."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from data_pipelines import builders, readers


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def clotho44(shared_data, tfds_dir):
  return builders.prepare("clotho", "44k", data_dir=tfds_dir,
                          manual_dir=shared_data / "clotho_eval7", progress=False)


@pytest.fixture(scope="module")
def audiocaps22(shared_data, tfds_dir):
  return builders.prepare("audiocaps", "22k", data_dir=tfds_dir,
                          manual_dir=shared_data / "audiocaps_test14", progress=False,
                          num_workers=2, clips_per_shard=5)


def test_no_tensorflow_anywhere(clotho44):
  del clotho44
  assert "tensorflow" not in sys.modules


def test_clotho_eval7_at_44k_is_bit_exact_and_in_csv_order(clotho44, shared_data):
  records = list(clotho44.as_data_source(split="test"))
  with open(shared_data / "clotho_eval7" / "clotho_captions_evaluation.csv",
            encoding="utf-8") as f:
    names = [line.split(",")[0] for line in f.read().splitlines()[1:]]
  assert [r["clip_id"].decode() for r in records] == names
  assert [r["clip_index"] for r in records] == list(range(7))
  for r in records:
    source, rate = soundfile.read(shared_data / "clotho_eval7" / r["file_name"].decode(),
                                  dtype="int16")
    assert rate == 44_100 == r["sample_rate"]
    np.testing.assert_array_equal(r["audio"], source)  # 15.7-29.5 s, stored whole
    assert len(r["captions"]) == 5
  summary = clotho44.summary["splits"]["test"]
  assert summary["clips"] == 7 and summary["captions"] == 35
  assert 0.04 < summary["hours"] < 0.05


def test_audiocaps_test14_at_22k_downmixes_stereo_and_keeps_short_clips(audiocaps22,
                                                                        shared_data):
  records = list(audiocaps22.as_data_source(split="test"))
  assert len(records) == 14
  by_id = {r["clip_id"].decode(): r for r in records}
  stereo = 0
  for clip_id, r in by_id.items():
    source, rate = soundfile.read(shared_data / "audiocaps_test14" / "test" / f"{clip_id}.wav",
                                  dtype="int16", always_2d=True)
    assert rate == 22_050 == r["source_sample_rate"] and r["sample_rate"] == 22_050
    assert r["source_channels"] == source.shape[1]
    expected = np.round(source.astype(np.float64).mean(axis=1))
    assert np.max(np.abs(r["audio"].astype(np.float64) - expected)) <= 1
    stereo += source.shape[1] == 2
    meta = json.loads(r["metadata"])
    assert f"{meta['youtube_id']}_{meta['start_time']}" == clip_id
    assert len(meta["audiocap_ids"]) == len(r["captions"]) == 5
  assert stereo == 11
  lengths = [len(r["audio"]) / 22_050 for r in records]
  assert min(lengths) < 9.0 and max(lengths) <= 10.0  # the 7.4 s clip is not padded
  assert audiocaps22.summary["splits"]["test"]["notes"] == {"downmixed": 11}


def test_resampling_to_another_config(shared_data, tmp_path):
  b = builders.prepare("clotho", "16k", data_dir=tmp_path, progress=False,
                       manual_dir=shared_data / "clotho_eval7")
  for r in b.as_data_source(split="test"):
    frames = soundfile.info(shared_data / "clotho_eval7" / r["file_name"].decode()).frames
    assert abs(len(r["audio"]) - frames * 16_000 / 44_100) <= 1
  assert b.summary["splits"]["test"]["notes"] == {"resampled": 7}


def test_readable_through_the_tfds_apis(clotho44, audiocaps22, tfds_dir):
  del clotho44, audiocaps22
  source = tfds.data_source("clotho/44k", split="test", data_dir=os.fspath(tfds_dir))
  assert len(source) == 7
  builder = tfds.builder("audiocaps/22k", data_dir=os.fspath(tfds_dir))
  assert builder.info.splits["test"].num_examples == 14
  assert builder.info.splits["test"].num_shards == 3  # clips_per_shard=5
  assert builder.info.metadata["sample_rate"] == 22_050
  from_dir = tfds.builder_from_directory(os.fspath(builder.data_path))
  assert from_dir.as_data_source(split="test")[13]["clip_index"] == 13
  # A second prepare reuses the dataset and its saved report.
  again = builders.prepare("audiocaps", "22k", data_dir=tfds_dir, progress=False,
                           manual_dir="/nonexistent")
  assert again.summary["splits"]["test"]["clips"] == 14


def test_interrupted_preparation_resumes_without_redoing_or_duplicating(shared_data, tmp_path,
                                                                        monkeypatch):
  kwargs = dict(data_dir=tmp_path, manual_dir=shared_data / "audiocaps_test14", progress=False,
                clips_per_shard=3)
  written = []
  real_write = builders.write_shard

  def dies_on_third_shard(job, on_clip=None):
    if len(written) == 2:
      raise KeyboardInterrupt("simulated ^C")
    written.append(job.index)
    return real_write(job, on_clip)

  monkeypatch.setattr(builders, "write_shard", dies_on_third_shard)
  with pytest.raises(KeyboardInterrupt):
    builders.prepare("audiocaps", "16k", **kwargs)
  work = builders.builder("audiocaps", "16k", data_dir=tmp_path).work_dir
  assert sorted(p.name for p in work.glob("*.json")) == ["test-00000.json", "test-00001.json"]
  (work / "test-00002.array_record.tmp999").write_bytes(b"half a shard")  # killed mid-write

  written.clear()
  monkeypatch.setattr(builders, "write_shard", lambda job, on_clip=None: (
      written.append(job.index), real_write(job, on_clip))[1])
  b = builders.prepare("audiocaps", "16k", **kwargs)
  assert written == [2, 3, 4]  # 14 clips / 3 per shard: shards 0 and 1 were reused
  ids = [r["clip_id"] for r in b.as_data_source(split="test")]
  assert len(ids) == len(set(ids)) == 14
  assert not work.exists()  # cleaned up once the dataset is complete


def test_changed_inputs_rebuild_only_their_shards(shared_data, tmp_path, monkeypatch):
  download = tmp_path / "download"
  (download / "test").mkdir(parents=True)
  for wav in (shared_data / "audiocaps_test14" / "test").iterdir():
    (download / "test" / wav.name).symlink_to(wav)
  rows = (shared_data / "audiocaps_test14" / "test.csv").read_text().splitlines()
  (download / "test.csv").write_text("\n".join(rows) + "\n")
  kwargs = dict(data_dir=tmp_path / "tfds", manual_dir=download, progress=False,
                clips_per_shard=4)
  written = []
  real_write = builders.write_shard
  monkeypatch.setattr(builders, "write_shard", lambda job, on_clip=None: (
      written.append(job.index), real_write(job, on_clip))[1])
  # Keep the finished shards as if the run had stopped before assembling the dataset.
  monkeypatch.setattr(builders.AudioCaptionBuilder, "_post_download_and_prepare_hook",
                      lambda self: None)
  b = builders.prepare("audiocaps", "16k", **kwargs)
  assert written == [0, 1, 2, 3]  # 14 clips, 4 per shard
  shutil.rmtree(b.data_path)
  # Edit one caption of the last clip (clip_index 13, in shard 3).
  last = readers.read_audiocaps_captions(download / "test.csv")[-1]
  row = next(i for i, r in enumerate(rows) if r.split(",")[1:3] == [
      last.metadata["youtube_id"], last.metadata["start_time"]])
  rows[row] = ",".join(rows[row].split(",")[:3]) + ",an edited caption"
  (download / "test.csv").write_text("\n".join(rows) + "\n")
  written.clear()
  b = builders.prepare("audiocaps", "16k", **kwargs)
  assert written == [3]
  captions = [c for r in b.as_data_source(split="test") for c in r["captions"]]
  assert b"an edited caption" in captions and len(captions) == 70


def test_cli_prints_the_closing_summary(shared_data, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.prepare", "--dataset=audiocaps",
       f"--manual_dir={shared_data / 'audiocaps_test14'}", f"--data_dir={tmp_path}",
       "--sample_rate=16000", "--num_workers=1", "--progress=false"],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "audiocaps/16k (16000 Hz)" in out
  assert "14 clips of 14 in the CSV" in out and "70 captions" in out
  assert "handled: downmixed 11, resampled 14" in out
  assert "h of audio" in out
  assert (tmp_path / "audiocaps" / "16k" / "1.0.0" / builders.REPORT_FILENAME).is_file()


def test_cli_errors_are_one_clear_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.prepare", "--dataset=clotho",
       f"--manual_dir={tmp_path}", f"--data_dir={tmp_path / 'out'}", "--progress=false"],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert "error: no clotho caption CSV in" in result.stderr
  assert "Traceback" not in result.stderr


def test_data_pipelines_import_neither_jax_nor_tensorflow():
  code = ("import sys\n"
          "from data_pipelines import audio_io, builders, prepare, readers, synthcaps\n"
          "print(sorted(m for m in ('jax', 'tensorflow', 'grain') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
  assert result.stdout.strip() == "[]"
