"""Your own folder: captions/labels CSVs, splits, bad rows, label positives, class-level T2A,
and ESC-50 (a few real clips of ../shared/data/esc50_dev) prepared and trained on for a step."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import folder, readers
from hade_jax import evaluator, input_pipeline, losses, metrics

ESC50_FIELDS = "file_name,fold,target,category,esc10,src_file,take"


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


def _audio(folder_path, names):
  """Empty files: finding a clip's audio needs only its name (decoding is not tested here)."""
  folder_path.mkdir(parents=True, exist_ok=True)
  for name in names:
    (folder_path / name).write_bytes(b"")


def _load(spec, root, splits=folder.SPLITS):
  reports = {s: readers.Report() for s in splits}
  return folder.load_splits(spec, root, list(splits), reports=reports), reports


def _captions(sources):
  return {s: {e.clip_id: e.captions for e in src.entries} for s, src in sources.items()}


def test_wide_csv_with_a_split_column(tmp_path):
  _audio(tmp_path / "wav", ["a.wav", "b.wav", "c.flac"])
  _write(tmp_path / "caps.csv", "file_name,split,caption_1,caption_2\n"
         "a.wav,train,a dog barks, a  dog\n"
         "b.wav,test,rain falls,rain\n"
         "c.flac,train,wind,\n")
  spec = folder.FolderSpec(name="mine", csv="caps.csv", audio_dir="wav")
  sources, reports = _load(spec, tmp_path, ("train", "test"))
  assert _captions(sources) == {"train": {"a.wav": ["a dog barks", "a dog"], "c.flac": ["wind"]},
                                "test": {"b.wav": ["rain falls", "rain"]}}
  assert [e.clip_index for e in sources["train"].entries] == [0, 2]  # position in the CSV
  [issue] = reports["train"].issues  # c.flac's empty caption_2, reported on its line
  assert (issue.kind, issue.line) == ("empty_caption", 4)


def test_long_csv_groups_rows_by_file_and_separate_csvs_give_splits(tmp_path):
  _audio(tmp_path, ["a.wav", "b.wav", "c.wav"])
  _write(tmp_path / "train.csv", "file_name,caption\na.wav,one\nb.wav,two\na.wav,three\n")
  _write(tmp_path / "val.csv", "caption,file_name\nfour,c.wav\n")
  spec = folder.FolderSpec(name="mine", split_csvs={"train": "train.csv",
                                                    "validation": "val.csv"})
  assert spec.splits() == ["train", "validation"]
  sources, reports = _load(spec, tmp_path, ("train", "validation"))
  assert _captions(sources) == {"train": {"a.wav": ["one", "three"], "b.wav": ["two"]},
                                "validation": {"c.wav": ["four"]}}
  assert sources["train"].entries[0].line == 2
  assert not any(r.issues for r in reports.values())


def test_labels_become_template_captions_and_folds_choose_splits(tmp_path):
  _audio(tmp_path / "audio", ["1-1-A-0.wav", "2-1-A-1.wav", "3-1-A-0.wav", "4-1-A-1.wav"])
  _write(tmp_path / "esc50.csv", ESC50_FIELDS + "\n"
         "1-1-A-0.wav,1,0,dog_bark,True,1,A\n2-1-A-1.wav,2,1,rooster,False,1,A\n"
         "3-1-A-0.wav,3,0,dog_bark,True,1,A\n4-1-A-1.wav,4,1,rooster,False,1,A\n")
  spec = folder.FolderSpec(name="esc", csv="esc50.csv", audio_dir="audio", split_column="fold",
                           split_values={"train": ("1", "2"), "test": ("3",)},
                           label_column="category", templates=("the sound of {}", "{}"))
  sources, _ = _load(spec, tmp_path, ("train", "test"))
  assert _captions(sources) == {
      "train": {"1-1-A-0.wav": ["the sound of dog bark", "dog bark"],
                "2-1-A-1.wav": ["the sound of rooster", "rooster"]},
      "test": {"3-1-A-0.wav": ["the sound of dog bark", "dog bark"]}}  # fold 4: no split
  assert [e.metadata["label"] for e in sources["train"].entries] == ["dog_bark", "rooster"]
  assert folder.class_names(spec, tmp_path) == ["dog_bark", "rooster"]
  with pytest.raises(ValueError, match="exactly one {}"):
    folder.FolderSpec(name="esc", csv="esc50.csv", label_column="category",
                      templates=("the sound of {label}",))


def test_bad_rows_and_missing_audio_are_reported_with_file_and_line(tmp_path):
  _audio(tmp_path, ["a.wav", "b.wav"])
  csv_path = _write(tmp_path / "caps.csv", "file_name,split,caption\n"
                    "a.wav,train,fine\n"
                    "b.wav,train,too,many\n"
                    "gone.wav,train,no file\n"
                    ",train,no name\n")
  spec = folder.FolderSpec(name="mine", csv="caps.csv")
  sources, reports = _load(spec, tmp_path, ("train",))
  assert [e.clip_id for e in sources["train"].entries] == ["a.wav"]
  found = sorted((i.kind, i.path, i.line) for i in reports["train"].issues)
  assert found == [("malformed_row", str(csv_path), 3), ("malformed_row", str(csv_path), 5),
                   ("missing_audio", str(csv_path), 4)]
  _write(tmp_path / "bad.csv", "name,text\na.wav,x\n")
  with pytest.raises(readers.DataError, match=r"bad\.csv:1: .*lacks file_name, split"):
    _load(folder.FolderSpec(name="mine", csv="bad.csv"), tmp_path, ("train",))


def test_class_level_t2a_matches_a_hand_computation():
  # 4 clips of classes [0, 0, 1, 1]; caption 0 belongs to clip 0, caption 1 to clip 2.
  scores_AxT = np.array([[0.2, 0.8], [0.9, 0.1], [0.5, 0.3], [0.1, 0.4]])
  caption_clip_T, group_A = np.array([0, 2]), np.array([0, 0, 1, 1])
  m = metrics.retrieval_metrics(scores_AxT, caption_clip_T, clip_group_A=group_A)
  # Caption 0: relevant clips 1 (rank 1) and 0 (2nd relevant, after clip 2: rank 3).
  # Caption 1: relevant clips 3 (after clip 0: rank 2) and 2 (rank 3).
  assert m["t2a/R@1"] == 50.0 and m["t2a/R@5"] == 100.0
  assert m["t2a/mAP@10"] == pytest.approx(100 * ((1 / 1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
  assert m["t2a/median_rank"] == 1.5
  per_clip = metrics.retrieval_metrics(scores_AxT, caption_clip_T)
  assert per_clip["t2a/R@1"] == 0.0  # clip 0 and clip 2 are each beaten by a clip of its class
  assert {k: v for k, v in m.items() if k.startswith("a2t")} == {
      k: v for k, v in per_clip.items() if k.startswith("a2t")}
  # One clip per class is the per-clip rule.
  rng = np.random.default_rng(0)
  s, c = rng.normal(size=(5, 10)), np.repeat(np.arange(5), 2)
  assert metrics.retrieval_metrics(s, c, clip_group_A=np.arange(5)) == pytest.approx(
      metrics.retrieval_metrics(s, c))
  # Two-stage: a shortlist of one clip by global cosine (clip 0 for both captions).
  global_AxT = np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
  two = evaluator.split_metrics(scores_AxT, global_AxT, caption_clip_T, clip_group_A=group_A,
                                shortlists=(1, 4))
  assert two["two_stage@1/t2a/R@1"] == 50.0
  assert two["two_stage@1/t2a/mAP@10"] == pytest.approx(100 * (1 / 2 + 0) / 2)
  assert two["two_stage@4/t2a/mAP@10"] == pytest.approx(m["t2a/mAP@10"])


# ---------------------------------------------------------------------------------------------
# ESC-50: 3 classes x folds 1 and 5 of the real clips, prepared through TFDS and trained on.

CLASSES = ("0", "1", "2")


@pytest.fixture(scope="module")
def esc50_subset(shared_data, tmp_path_factory):
  """A folder with the real rows of esc50_dev.csv for 3 classes of folds 1 and 5 and links to
  their audio (nothing is copied)."""
  root = tmp_path_factory.mktemp("esc50_subset")
  (root / "audio").mkdir()
  with open(shared_data / "esc50_dev" / "esc50_dev.csv", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  keep = [r for r in rows[1:] if r[1] in ("1", "5") and r[2] in CLASSES]
  with open(root / "esc50_dev.csv", "w", encoding="utf-8", newline="") as f:
    csv.writer(f).writerows([rows[0]] + keep)
  for r in keep:
    os.symlink(shared_data / "esc50_dev" / "audio" / r[0], root / "audio" / r[0])
  return root


@pytest.fixture(scope="module")
def esc50_run(esc50_subset, minilm_dir, tmp_path_factory):
  """configs/esc50.py's data section on the subset, the tiny model, one training step; the
  folder is prepared by the trainer itself (prepare_if_missing)."""
  from configs import esc50
  from hade_jax import trainer
  from tests.tiny_train_config import tiny_config

  data_dir = tmp_path_factory.mktemp("tfds")
  config = tiny_config(data_dir, minilm_dir, total_steps=1, final_eval_split="")
  esc = esc50.get_config().data
  for key in ("dataset", "builder_config", "prepare_if_missing", "synth_size", "folder_name",
              "folder_csv", "folder_audio_dir", "folder_split_column", "folder_label_column"):
    config.data[key] = esc[key]
  config.data.manual_dir = str(esc50_subset)
  config.data.folder_split_values = {"train": ("1",), "validation": ("5",), "test": ("5",)}
  config.log_batch_ids = True
  workdir = tmp_path_factory.mktemp("workdir")
  groups = []  # what the trainer's validation (at the last step) measured T2A by

  def spy(*args, clip_group_A=None, **kwargs):
    groups.append(clip_group_A)
    return retrieval_metrics(*args, clip_group_A=clip_group_A, **kwargs)

  retrieval_metrics = metrics.retrieval_metrics
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(metrics, "retrieval_metrics", spy)
    trainer.train_and_evaluate(config, workdir)
  return config, workdir, groups


def test_esc50_config_validates_and_its_grid_fits_5_s_clips():
  from configs import esc50
  from hade_jax import hade, validation

  config = esc50.get_config()
  validation.validate_config(config, num_devices=1)
  cfg = hade.model_config(config)
  frames = cfg.mel.num_frames(int(config.data.crop_seconds * cfg.mel.sample_rate))
  # No 5 s crop stretched to the 10 s grid: the grid holds 5 s with < 20 % to spare.
  assert frames <= cfg.audio.num_frames < 1.2 * frames
  assert config.data.folder_split_values.to_dict() == {
      "train": ("1", "2"), "validation": ("3",), "test": ("5",)}


def test_esc50_subset_prepares_with_labels_and_trains_a_step(esc50_run):
  config, workdir, groups = esc50_run
  from hade_jax import data, hade

  ds = data.open_dataset(config, hade.model_config(config))
  assert ds.splits == {"train": 15, "validation": 15, "test": 15}
  # The trainer's validation is class-level: every clip's class index was given.
  [group_A] = groups
  assert np.array_equal(group_A, data.eval_split(config, ds, "validation").clip_group)
  test = data.eval_split(config, ds, "test")
  assert test.classes == ["dog", "pig", "rooster"]  # ESC-50 targets 0, 1, 2
  assert sorted(test.labels) == sorted(["dog", "pig", "rooster"] * 5)
  assert test.texts[0] == f"This is a sound of {test.labels[0]}."
  assert np.array_equal(np.bincount(test.clip_group), [5, 5, 5])
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert np.isfinite([x["train/loss"] for x in lines if "train/loss" in x]).all()
  assert any("val/t2a/mAP@10" in x for x in lines)
  # A labels split also measures zero-shot classification over its classes.
  [val] = [x for x in lines if "val/zero_shot/top1" in x]
  assert 0 <= val["val/zero_shot/top1"] <= val["val/zero_shot/top5"] == 100.0  # 3 classes
  assert {f"val/zero_shot/per_class/{c}" for c in test.classes} <= val.keys()
  assert len(json.loads((workdir / "batches.jsonl").read_text())["clip_id"]) == 8


def test_same_label_clips_are_positives_in_the_batch_and_the_loss(esc50_run):
  config, _, _ = esc50_run
  from hade_jax import data, hade

  ds = data.open_dataset(config, hade.model_config(config))
  source = input_pipeline.open_source(ds.input_cfg, "train")
  raw = source.without_audio()
  label_of = {raw[i]["clip_id"]: raw[i]["label_index"] for i in range(len(raw))}
  batch = next(input_pipeline.make_train_loader(ds.input_cfg, seed=0, batch_size=8))
  ids_B = input_pipeline.positive_ids(batch)
  assert ids_B.tolist() == [label_of[c] for c in batch["clip_id"].tolist()]
  pos_BxB = np.asarray(losses.positives(ids_B, ids_B))
  same_label = np.equal.outer(ids_B, ids_B)
  other_clip = ~np.equal.outer(batch["clip_id"], batch["clip_id"])
  assert np.array_equal(pos_BxB, same_label)
  assert (pos_BxB & other_clip).any()  # 8 rows of 3 classes: two clips share a class
  # In the loss: raising the score of another clip of the same class lowers the loss with
  # class positives (pulled together); with clip positives it would raise it (pushed apart).
  def grad(pos):
    return np.asarray(jax.grad(losses.info_nce)(jnp.zeros((8, 8)), pos))

  pair = pos_BxB & other_clip
  assert (grad(pos_BxB)[pair] < 0).all()
  assert (grad(np.equal.outer(batch["clip_id"], batch["clip_id"]))[pair] > 0).all()
