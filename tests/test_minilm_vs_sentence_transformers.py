"""The real all-MiniLM-L6-v2 imported into BertModel: sentence embeddings of every caption of
the Clotho v2.1 evaluation split against sentence-transformers on the same token ids."""

import csv
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx

from hade_jax import bert
from hade_jax.convert import bert as convert_bert

CLOTHO_EVAL = "captions/clotho_v2.1/clotho_captions_evaluation.csv"
BATCH = 128  # rows per jitted call; a bucket's last batch is filled with empty rows
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def captions(shared_data):
  # Clotho's metadata CSVs are ISO-8859-1; quoted file names hold commas: a real CSV parser.
  with open(shared_data / CLOTHO_EVAL, encoding="iso-8859-1", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1045
  texts = [row[f"caption_{i}"] for row in rows for i in range(1, 6)]
  assert len(texts) == 5225 and all(texts)
  return texts


@pytest.fixture(scope="module")
def sentence_model(minilm_dir):
  from sentence_transformers import SentenceTransformer

  return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def token_ids(minilm_dir, sentence_model, captions):
  """The model's own tokenizer.json, truncating where sentence-transformers does."""
  max_len = json.loads((minilm_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
  assert max_len == sentence_model.max_seq_length == 256
  tok = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  # The shipped tokenizer.json pads and truncates to 128; sentence-transformers overrides it.
  tok.no_padding()
  tok.enable_truncation(max_len)
  ids = [np.asarray(e.ids, np.int32) for e in tok.encode_batch(captions)]
  assert all(e.type_ids == [0] * len(e.ids) for e in tok.encode_batch(captions[:50]))
  return ids


def test_token_ids_are_sentence_transformers(sentence_model, captions, token_ids):
  """Both sides see identical ids: ours against sentence-transformers' own preprocessing."""
  for start in range(0, len(captions), 1024):
    features = sentence_model.preprocess(captions[start:start + 1024])
    st_ids = features["input_ids"].numpy()
    st_mask = features["attention_mask"].numpy()
    for i, ids in enumerate(token_ids[start:start + 1024]):
      assert st_mask[i].sum() == len(ids)
      np.testing.assert_array_equal(st_ids[i, :len(ids)], ids, err_msg=captions[start + i])


@functools.partial(jax.jit, static_argnums=0)
def _sentence_embeddings(graphdef, state, ids_BxM, mask_BxM):
  final_BxMxW, _ = nnx.merge(graphdef, state)(ids_BxM, mask_BxM)
  # all-MiniLM-L6-v2's modules.json: Transformer -> Pooling(mean tokens) -> Normalize.
  return bert.l2_normalize(bert.mean_pool(final_BxMxW, mask_BxM))


def _encode(model, token_ids):
  """Captions grouped by padded length (multiples of 8), in batches of BATCH rows.

  One compilation per length bucket (4 for Clotho: 10-35 tokens), and about 20% padding.
  """
  graphdef, state = nnx.split(model)
  lengths = np.array([len(ids) for ids in token_ids])
  padded = -(-lengths // 8) * 8
  out = np.zeros((len(token_ids), model.cfg.hidden_size), np.float32)
  for m in np.unique(padded):
    bucket = np.flatnonzero(padded == m)
    for start in range(0, len(bucket), BATCH):
      rows = bucket[start:start + BATCH]
      ids = np.zeros((BATCH, m), np.int32)  # [PAD] = 0; unused rows stay empty
      mask = np.zeros((BATCH, m), np.int32)
      for r, row in enumerate(rows):
        ids[r, :lengths[row]] = token_ids[row]
        mask[r, :lengths[row]] = 1
      emb = _sentence_embeddings(graphdef, state, jnp.asarray(ids), jnp.asarray(mask))
      out[rows] = np.asarray(emb)[:len(rows)]
  return out


def test_minilm_matches_sentence_transformers(minilm_dir, sentence_model, captions, token_ids):
  model, cfg, report = convert_bert.load_text_tower(minilm_dir)
  assert cfg == bert.BertConfig.minilm_l6()
  assert not report.missing and not report.unused
  assert report.expected_unused == ["embeddings.position_ids"]
  assert len(report.loaded) == 103  # 6 blocks x 16 + embeddings 5 + pooler 2

  ours = _encode(model, token_ids)
  want = sentence_model.encode(captions, batch_size=256, convert_to_numpy=True)
  assert want.shape == ours.shape == (5225, 384)
  # Normalize is part of the model's pipeline: both sides are unit vectors.
  np.testing.assert_allclose(np.linalg.norm(want, axis=1), 1.0, atol=1e-5)
  cosine = np.sum(ours * want, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(want, axis=1)
  worst = int(np.argmin(cosine))
  assert cosine.min() >= MIN_COSINE, f"cosine {cosine.min()} on {captions[worst]!r}"
  assert np.abs(ours - want).max() < 1e-5
