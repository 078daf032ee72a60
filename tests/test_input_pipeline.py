"""Grain pipelines: shapes, crops, captions, sharding, determinism, resume, eval, SpecAugment."""

import dataclasses

import numpy as np
import pytest

from data_pipelines import builders
from hade_jax import input_pipeline as ip
from hade_jax import tokenizer as tokenizer_lib

RATE = 16_000
CLIPS = 12  # synthcaps tiny train split, 4 s clips


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  builders.prepare("synthcaps", "tiny_16k", data_dir=path, progress=False)
  return path


@pytest.fixture(scope="module")
def cfg(tfds_dir, minilm_dir):
  return ip.InputConfig(data_dir=str(tfds_dir), dataset="synthcaps", config="tiny_16k",
                        sample_rate=RATE, tokenizer_path=str(minilm_dir), crop_seconds=3.0,
                        max_text_len=48,
                        specaug=ip.SpecAugmentConfig(num_frames=301, num_mel_bins=64,
                                                     time_stripe_width=40))


@pytest.fixture(scope="module")
def records(cfg):
  source = ip.open_source(cfg, "train")
  return {r["clip_id"]: r for r in (source[i] for i in range(len(source)))}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  if len(a) != len(b):
    return False
  return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
             for x, y in zip(a, b, strict=True))


def test_train_batch_shapes_and_dtypes(cfg):
  batch = next(ip.make_train_loader(cfg, seed=0, batch_size=4))
  expected = {"audio": ((4, 48_000), np.float32), "audio_length": ((4,), np.int32),
              "input_ids": ((4, 48), np.int32), "attention_mask": ((4, 48), np.int32),
              "clip_id": ((4,), np.int32), "caption_index": ((4,), np.int32),
              "specaug_time": ((4, 2, 2), np.int32), "specaug_freq": ((4, 2, 2), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert np.all(np.abs(batch["audio"]) <= 1.0)


def test_crops_are_windows_of_the_record_and_captions_are_its_own(cfg, records):
  tok = tokenizer_lib.Tokenizer(cfg.tokenizer_path, cfg.max_text_len)
  for batch in _take(ip.make_train_loader(cfg, seed=1, batch_size=4), 3):
    for b in range(4):
      r = records[int(batch["clip_id"][b])]
      full = r["audio"].astype(np.float32) / 32768.0
      x = batch["audio"][b]
      starts = np.nonzero(np.all(
          np.lib.stride_tricks.sliding_window_view(full, 16) == x[:16], axis=1))[0]
      assert any(np.array_equal(full[s:s + len(x)], x) for s in starts)
      assert batch["audio_length"][b] == 48_000
      ids, mask = tok.encode_one(r["captions"][batch["caption_index"][b]])
      np.testing.assert_array_equal(batch["input_ids"][b], ids)
      np.testing.assert_array_equal(batch["attention_mask"][b], mask)


def test_short_clips_are_padded_with_zeros_or_repeated(cfg, records):
  long_cfg = dataclasses.replace(cfg, crop_seconds=5.0)
  batch = next(ip.make_train_loader(long_cfg, seed=0, batch_size=4))
  for b in range(4):
    r = records[int(batch["clip_id"][b])]
    n = len(r["audio"])
    assert batch["audio_length"][b] == n == 4 * RATE
    np.testing.assert_array_equal(batch["audio"][b][:n], r["audio"] / np.float32(32768))
    assert not batch["audio"][b][n:].any()
  repeat = next(ip.make_train_loader(dataclasses.replace(long_cfg, pad_mode="repeat"), seed=0,
                                     batch_size=4))
  r = records[int(repeat["clip_id"][0])]
  np.testing.assert_array_equal(repeat["audio"][0][4 * RATE:], r["audio"][:RATE] / 32768.0)
  assert repeat["audio_length"][0] == 5 * RATE


def test_epochs_cover_every_clip_once_and_resample_captions(cfg):
  batches = _take(ip.make_train_loader(cfg, seed=2, batch_size=4), 9)  # 3 epochs
  epochs = [np.concatenate([b["clip_id"] for b in batches[e * 3:e * 3 + 3]]) for e in range(3)]
  for ids in epochs:
    assert sorted(ids) == list(range(CLIPS))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
  captions = {}
  for b in batches:
    for clip, k in zip(b["clip_id"], b["caption_index"], strict=True):
      captions.setdefault(int(clip), []).append(int(k))
  assert any(len(set(v)) > 1 for v in captions.values())


def test_finite_epochs_and_seeds(cfg):
  ds = ip.make_train_dataset(cfg, seed=0, batch_size=5, num_epochs=2)
  assert len(list(ds)) == 2 * CLIPS // 5
  a = _take(ip.make_train_loader(cfg, seed=7, batch_size=4), 3)
  b = _take(ip.make_train_loader(cfg, seed=7, batch_size=4), 3)
  c = _take(ip.make_train_loader(cfg, seed=8, batch_size=4), 3)
  assert _same(a, b) and not _same(a, c)


def test_processes_get_disjoint_shards_of_each_epoch(cfg):
  seen = []
  for index in range(2):
    it = ip.make_train_loader(cfg, seed=3, batch_size=3, shard_index=index, shard_count=2)
    seen.append(np.concatenate([b["clip_id"] for b in _take(it, 2)]))  # 6 each = 1 epoch
  assert set(seen[0]).isdisjoint(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(CLIPS))
  with pytest.raises(ValueError, match="shard_index"):
    ip.make_train_dataset(cfg, seed=0, batch_size=2, shard_index=2, shard_count=2)


def test_restored_iterator_yields_exactly_the_uninterrupted_batches(cfg):
  reference = _take(ip.make_train_loader(cfg, seed=4, batch_size=4), 7)
  it = ip.make_train_loader(cfg, seed=4, batch_size=4)
  _take(it, 4)
  state = it.get_state()
  restored = ip.make_train_loader(cfg, seed=4, batch_size=4)
  restored.set_state(state)
  assert _same(_take(restored, 3), reference[4:])


def test_worker_processes_change_nothing_and_resume_exactly(cfg):
  reference = _take(ip.make_train_loader(cfg, seed=5, batch_size=4), 6)
  it = ip.make_train_loader(cfg, seed=5, batch_size=4, num_workers=2)
  try:
    first = _take(it, 3)
    state = it.get_state()
  finally:
    it.close()
  assert _same(first, reference[:3])
  restored = ip.make_train_loader(cfg, seed=5, batch_size=4, num_workers=2)
  try:
    restored.set_state(state)
    assert _same(_take(restored, 3), reference[3:])
  finally:
    restored.close()


def test_orbax_checkpoint_of_the_iterator(cfg, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  reference = _take(ip.make_train_loader(cfg, seed=6, batch_size=4), 5)
  it = ip.make_train_loader(cfg, seed=6, batch_size=4)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    fresh = ip.make_train_loader(cfg, seed=6, batch_size=4)
    restored = manager.restore(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))["data"]
  assert _same(_take(restored, 3), reference[2:])


def test_specaug_stripes_and_their_device_mask(cfg):
  import jax.numpy as jnp

  batch = next(ip.make_train_loader(cfg, seed=0, batch_size=4))
  t, f = batch["specaug_time"], batch["specaug_freq"]
  assert np.all((t[..., 1] >= 0) & (t[..., 1] <= 40) & (t[..., 0] >= 0))
  assert np.all(t[..., 0] + t[..., 1] <= 301)
  assert np.all((f[..., 1] <= 8) & (f[..., 0] + f[..., 1] <= 64))
  mel = np.random.default_rng(0).standard_normal((4, 301, 64)).astype(np.float32)
  out = np.asarray(ip.apply_spec_augment(jnp.asarray(mel), jnp.asarray(t), jnp.asarray(f),
                                         fill_value=-5.0))
  expected = mel.copy()
  for b in range(4):
    for start, width in t[b]:
      expected[b, start:start + width, :] = -5.0
    for start, width in f[b]:
      expected[b, :, start:start + width] = -5.0
  np.testing.assert_array_equal(out, expected)
  off = dataclasses.replace(cfg, specaug=None)
  assert "specaug_time" not in next(ip.make_train_loader(off, seed=0, batch_size=2))


@pytest.mark.parametrize("policy", ["head", "center", "windows"])
def test_eval_audio_covers_every_clip_deterministically(cfg, records, policy):
  c = dataclasses.replace(cfg, eval_crop=policy, crop_seconds=1.5)
  batches = list(ip.make_eval_audio_loader(c, split="train", batch_size=5))
  again = list(ip.make_eval_audio_loader(c, split="train", batch_size=5))
  assert _same(batches, again)
  valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
  clip = np.concatenate([b["clip_id"] for b in batches])[valid]
  window = np.concatenate([b["window_index"] for b in batches])[valid]
  audio = np.concatenate([b["audio"] for b in batches])[valid]
  s = 24_000
  if policy == "windows":
    # 4 s in 1.5 s windows: 0-1.5, 1.5-3, and the last one aligned to the end, 2.5-4.
    assert list(clip) == [i for i in range(CLIPS) for _ in range(3)]
    assert list(window) == [0, 1, 2] * CLIPS
    starts = [0, s, 4 * RATE - s] * CLIPS
  else:
    assert list(clip) == list(range(CLIPS))
    starts = [0 if policy == "head" else (4 * RATE - s) // 2] * CLIPS
  for row, (c_id, start) in enumerate(zip(clip, starts, strict=True)):
    np.testing.assert_array_equal(audio[row], records[c_id]["audio"][start:start + s] / 32768.0)


def test_eval_rows_are_dealt_to_processes_with_equal_batch_counts(cfg):
  per = [list(ip.make_eval_audio_loader(cfg, split="train", batch_size=5, shard_index=i,
                                        shard_count=2)) for i in range(2)]
  assert len(per[0]) == len(per[1])
  ids = [b["clip_id"][b["valid"] == 1] for p in per for b in p]
  assert sorted(np.concatenate(ids)) == list(range(CLIPS))
  assert all(b["audio"].shape == (5, 48_000) for p in per for b in p)


def test_eval_captions_hold_all_captions_with_their_clip(cfg, records):
  captions = ip.eval_captions(cfg, split="train")
  assert len(captions.texts) == 5 * CLIPS
  assert captions.input_ids.shape == (5 * CLIPS, 48)
  assert list(captions.clip_ids) == list(range(CLIPS))
  for text, clip, k in zip(captions.texts, captions.clip_id, captions.caption_index,
                           strict=True):
    assert records[int(clip)]["captions"][k] == text
  batches = [list(ip.eval_caption_batches(captions, 16, shard_index=i, shard_count=2))
             for i in range(2)]
  assert len(batches[0]) == len(batches[1]) == 2
  rows = np.concatenate([b["caption_row"][b["valid"] == 1] for p in batches for b in p])
  assert sorted(rows) == list(range(5 * CLIPS))
  first = batches[0][0]
  np.testing.assert_array_equal(first["input_ids"][0], captions.input_ids[0])
  assert first["clip_id"][0] == captions.clip_id[0]


def test_helpful_errors(cfg, tmp_path):
  with pytest.raises(ValueError, match=r"16000 Hz.*asks for 32000 Hz"):
    ip.open_source(dataclasses.replace(cfg, sample_rate=32_000), "train")
  with pytest.raises(FileNotFoundError, match=r"python -m data_pipelines\.prepare "
                     r"--dataset=clotho --config=32k --manual_dir="):
    ip.ClipSource(tmp_path, "clotho", "32k", "train")
  with pytest.raises(ValueError, match="no split 'nope'"):
    ip.open_source(cfg, "nope")
  with pytest.raises(ValueError, match="pad_mode"):
    dataclasses.replace(cfg, pad_mode="mirror")


def test_real_clips_read_back_through_grain(shared_data, tmp_path, minilm_dir):
  builders.prepare("clotho", "44k", data_dir=tmp_path, manual_dir=shared_data / "clotho_eval7",
                   progress=False)
  builders.prepare("audiocaps", "44k", data_dir=tmp_path, progress=False,
                   manual_dir=shared_data / "audiocaps_test14")
  for dataset, clips in (("clotho", 7), ("audiocaps", 14)):
    c = ip.InputConfig(data_dir=str(tmp_path), dataset=dataset, config="44k",
                       sample_rate=44_100, tokenizer_path=str(minilm_dir), crop_seconds=10.0,
                       eval_crop="windows")
    batch = next(ip.make_train_loader(c, seed=0, batch_size=clips, split="test"))
    assert sorted(batch["clip_id"]) == list(range(clips))
    assert batch["audio"].shape == (clips, 441_000)
    lengths = batch["audio_length"]
    assert (lengths == 441_000).sum() >= (clips if dataset == "clotho" else 1)
    if dataset == "audiocaps":
      assert lengths.min() < 9 * 44_100  # the 7.4 s clip is padded, and says so
    rows = [b for b in ip.make_eval_audio_loader(c, split="test", batch_size=8)]
    ids = np.concatenate([b["clip_id"][b["valid"] == 1] for b in rows])
    assert set(ids) == set(range(clips))
    if dataset == "clotho":  # 15.7-29.5 s clips: two or three 10 s windows each
      assert 14 <= len(ids) <= 21
    assert len(ip.eval_captions(c, split="test").texts) == 5 * clips
