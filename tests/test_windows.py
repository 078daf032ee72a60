"""Long audio by windows (eval_crop='windows', docs/method.md §9).

The policy places windows every hop with the last one aligned to the clip's end; a windowed
clip's features equal its windows encoded one by one and combined by hand (global mean, THA
frames concatenated with their masks, DCR factors of the pooled global); a clip no longer than
the crop gives the one-crop features; evaluation, the API and the search index agree.
The model is the tiny test HADE, randomly initialised (the policy needs a model, not a good one).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import soundfile
from flax import nnx

from data_pipelines import builders, policy
from hade_jax import api, eval, evaluator, search, validation
from tests.tiny_train_config import save_random_checkpoint, tiny_config

RATE = 16_000
HOP_SECONDS = 0.635  # half the tiny crop (1.27 s): windows overlap by half


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, minilm_dir) -> pathlib.Path:
  """A checkpoint of a randomly initialised tiny HADE, laid out as the trainer writes it."""
  return save_random_checkpoint(tmp_path_factory.mktemp("wd"), minilm_dir)


@pytest.fixture(scope="module")
def model(workdir, minilm_dir) -> api.Hade:
  config = tiny_config("", minilm_dir)
  config.data.eval_crop = "windows"
  config.data.window_hop_seconds = HOP_SECONDS
  return api.Hade.load(workdir, config)


def waves(seconds: float, seed: int) -> np.ndarray:
  return 0.3 * np.random.default_rng(seed).standard_normal(int(RATE * seconds)).astype(np.float32)


def jax_leaves(features) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(features)]


def test_windows_start_every_hop_and_the_last_ends_with_the_clip():
  assert policy.window_starts(25, 10, 10) == [0, 10, 15]
  assert policy.window_starts(25, 10, 5) == [0, 5, 10, 15]
  assert policy.window_starts(20, 10, 10) == [0, 10]  # whole windows: no extra one
  assert policy.window_starts(10, 10, 3) == [0] and policy.window_starts(4, 10, 3) == [0]
  assert policy.window_starts(25, 10, 5, max_windows=2) == [0, 5]
  assert policy.hop_samples(10, 0.0, 16_000) == 10  # 0 = the crop
  with pytest.raises(ValueError, match="window_hop_seconds"):
    policy.hop_samples(10, 1.0, 16_000)  # 16,000 samples > the crop: would skip audio
  x = np.arange(25, dtype=np.float32)
  np.testing.assert_array_equal(policy.fit_windows(x, 10, 10), [x[0:10], x[10:20], x[15:25]])
  short = np.arange(4, dtype=np.float32)
  np.testing.assert_array_equal(policy.fit_windows(short, 10, 5, pad_mode="repeat"),
                                [policy.fit_clip(short, 10, pad_mode="repeat")[0]])


def test_windows_embedding_equals_the_windows_encoded_by_hand(model):
  long, short = waves(3.3, 0), waves(0.8, 1)
  got = model.embed_audio([long, short], sample_rate=RATE)
  s, hop = model.num_samples, model.window_hop
  starts = list(range(0, len(long) - s, hop)) + [len(long) - s]  # written out, not asked for
  assert starts == [0, hop, 2 * hop, 3 * hop, len(long) - s]
  # The windows as one batch of the model itself (no Encoder, no pooling code).
  graphdef, state = nnx.split(model.model)
  encode = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode_audio(x))
  w = encode(state, jnp.asarray(np.stack([long[t:t + s] for t in starts])))
  by_hand = [jax.tree.map(lambda x, i=i: x[i:i + 1], w) for i in range(len(starts))]
  g_D = np.mean([np.asarray(f.global_AxD[0]) for f in by_hand], axis=0)
  np.testing.assert_allclose(got.global_AxD[0], g_D, atol=1e-5)
  factors = np.asarray(model.model.heads._factors(jnp.asarray(g_D)[None], None))[0]
  np.testing.assert_allclose(got.factors_AxKxd[0], factors, atol=1e-5)
  for k, (level, mask, logits) in enumerate(zip(got.levels, got.level_masks, got.level_logits,
                                                strict=True)):
    n = by_hand[0].levels[k].shape[1]
    np.testing.assert_allclose(level[0], np.concatenate([f.levels[k][0] for f in by_hand]),
                               atol=1e-5)
    np.testing.assert_allclose(logits[0], np.concatenate([f.level_logits[k][0] for f in by_hand]),
                               atol=1e-5)
    assert mask[0].all() and level.shape[1] == len(starts) * n
    # The short clip in the same batch: its one window, then masked padding.
    assert mask[1, :n].all() and not mask[1, n:].any()


def test_windows_short_clip_equals_the_one_crop_path_and_is_deterministic(model):
  short = waves(0.8, 1)
  windowed = model.embed_audio([short], sample_rate=RATE)
  head = model.embed_audio([short], sample_rate=RATE, crop="head")
  for a, b in zip(jax_leaves(windowed), jax_leaves(head), strict=True):
    np.testing.assert_array_equal(a, b)
  items = [waves(3.3, 0), short, waves(2.0, 2)]
  first = model.embed_audio(items, sample_rate=RATE, batch_size=2)
  again = model.embed_audio(items, sample_rate=RATE, batch_size=5)
  for a, b in zip(jax_leaves(first), jax_leaves(again), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  for a, b in zip(jax_leaves(first), jax_leaves(model.embed_audio(items, sample_rate=RATE,
                                                                  batch_size=2)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_windows_evaluation_end_to_end_on_clotho_eval7(workdir, shared_data, tmp_path):
  """`python -m hade_jax.eval --eval_crop=windows` on 7 real 15-30 s Clotho clips scores what
  the API's windowed embeddings score."""
  csv_path = shared_data / "clotho_eval7" / "clotho_captions_evaluation.csv"
  out = tmp_path / "eval"
  result = eval.main([f"--checkpoint={workdir}", f"--csv={csv_path}",
                      f"--audio_dir={shared_data / 'clotho_eval7' / 'evaluation'}",
                      "--eval_crop=windows", "--window_hop_seconds=1.27", f"--out={out}",
                      "--no_intervals", "--save_scores"])
  record = json.loads((out / "metrics.json").read_text())
  assert record["num_clips"] == 7 and record["num_captions"] == 35
  assert 0.0 <= result["t2a/R@1"] <= 100.0
  clips, _ = eval.read_folder_clips(csv_path, shared_data / "clotho_eval7" / "evaluation")
  config = eval.crop_config(None, workdir / "checkpoints" / "0", "windows", 1.27)
  hade_model = api.Hade.load(workdir, config)
  audio = hade_model.embed_audio([c.path for c in clips])
  assert audio.levels[0].shape[1] >= 13 * 16  # 15.7 s in 1.27 s windows: at least 13 windows
  texts = hade_model.embed_text([t for c in clips for t in c.captions])
  np.testing.assert_allclose(np.load(out / "scores.npy"), hade_model.score(audio, texts),
                             atol=1e-5)


def test_windows_search_index_pads_shards_and_returns_the_api_features(model, tmp_path):
  root = tmp_path / "audio"
  root.mkdir()
  lengths = {"a_long.wav": 3.3, "b_short.wav": 0.8, "c_mid.wav": 2.0}
  for i, (name, seconds) in enumerate(lengths.items()):
    soundfile.write(root / name, waves(seconds, i), RATE, subtype="PCM_16")
  index = search.build_index(model, root, tmp_path / "index", shard_size=1, progress=False)
  assert index.manifest["audio"]["settings"]["window_hop"] == model.window_hop
  assert index.names == sorted(lengths)
  expected = model.embed_audio([root / n for n in index.names])
  for a, b in zip(jax_leaves(index.take(np.arange(3))), jax_leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  hits = model.search(["noise"], search.Index(tmp_path / "index"), k=3, shortlist=0)
  assert sorted(h.name for h in hits[0]) == sorted(lengths)
  assert pathlib.Path(tmp_path / "index" / search.MANIFEST).is_file()


def test_windows_prepared_split_scores_what_the_api_scores(model, shared_data, tmp_path):
  """The TFDS evaluation pipeline's window rows (Grain, window_index) pool as the API does;
  --max_clips stops after the last window of the last clip kept."""
  builders.prepare("clotho", "16k", data_dir=tmp_path, manual_dir=shared_data / "clotho_eval7",
                   progress=False)
  config = ml_collections.ConfigDict(model.config.to_dict())
  config.data.dataset, config.data.builder_config = "clotho", "16k"
  config.data.data_dir, config.data.window_hop_seconds = str(tmp_path), 1.27
  split = eval.prepared_split(config, model.model.cfg, "test", max_clips=2)
  scored = evaluator.RetrievalEvaluator.from_config(config).evaluate(model.model, split)
  user = api.Hade(model.model, config)
  audio = user.embed_audio([shared_data / "clotho_eval7" / "evaluation" / name
                            for name in split.clip_names])
  assert len(split.clip_names) == 2 and audio.levels[0].shape[1] >= 13 * 16
  np.testing.assert_allclose(scored.scores_AxT, user.score(audio, user.embed_text(split.texts)),
                             atol=1e-5)


def test_windows_hop_longer_than_the_crop_is_refused_naming_the_field():
  config = tiny_config("", "")
  config.data.window_hop_seconds = 2.0  # the tiny crop is 1.27 s
  with pytest.raises(validation.ConfigError, match="data.window_hop_seconds"):
    validation.validate_config(config, training=False)
