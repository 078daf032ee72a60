"""Tokenizer: the text tower's files, checked against HF transformers' tokenizers."""

import pickle
import shutil

import numpy as np
import pytest
import tokenizers
import transformers

from hade_jax import tokenizer as tokenizer_lib

TEXTS = [
    "A dog barks three times, then a bell rings.",
    "PAPER RUSTLING WAS EVIDENT AS THE MAN SEARCHED FOR A MISSING DOCUMENT IN THE FILE.",
    "Wind is blowing and it’s raining — café ambience, naïve ümlauts",
    "",
    "word " * 80,  # longer than max_len: truncated, [SEP] kept
    "a literal [SEP] and <mask> in a caption",
]


def _reference(hf, max_len):
  enc = hf(TEXTS, max_length=max_len, truncation=True, padding="max_length")
  return np.array(enc["input_ids"]), np.array(enc["attention_mask"])


def test_minilm_tokenizer_json_matches_transformers(minilm_dir):
  tok = tokenizer_lib.Tokenizer(minilm_dir, max_len=32)
  ids, mask = tok(TEXTS)
  assert ids.shape == mask.shape == (len(TEXTS), 32)
  assert ids.dtype == mask.dtype == np.int32
  ref_ids, ref_mask = _reference(transformers.AutoTokenizer.from_pretrained(str(minilm_dir)), 32)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)
  assert ids[4, -1] == tok._load().token_to_id("[SEP]")  # pylint: disable=protected-access
  one_ids, one_mask = tok.encode_one(TEXTS[0])
  np.testing.assert_array_equal(one_ids, ids[0])
  np.testing.assert_array_equal(one_mask, mask[0])


def test_vocab_txt_fallback_equals_tokenizer_json(minilm_dir, tmp_path):
  for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(minilm_dir / name, tmp_path / name)
  from_vocab = tokenizer_lib.Tokenizer(tmp_path, max_len=24)(TEXTS)
  from_json = tokenizer_lib.Tokenizer(minilm_dir, max_len=24)(TEXTS)
  np.testing.assert_array_equal(from_vocab[0], from_json[0])
  np.testing.assert_array_equal(from_vocab[1], from_json[1])


@pytest.fixture(scope="module")
def roberta_files(tmp_path_factory):
  """A small byte-level BPE vocabulary in RoBERTa's file layout (vocab.json + merges.txt)."""
  path = tmp_path_factory.mktemp("roberta")
  bpe = tokenizers.ByteLevelBPETokenizer()
  corpus = [t for t in TEXTS if t] * 20 + ["the sound of rain and a siren in the background"] * 20
  bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
  bpe.save_model(str(path))
  (path / "tokenizer_config.json").write_text('{"tokenizer_class": "RobertaTokenizer"}')
  return path


def test_roberta_vocab_and_merges_fallback_matches_transformers(roberta_files):
  tok = tokenizer_lib.Tokenizer(roberta_files, max_len=20)
  ids, mask = tok(TEXTS)
  hf = transformers.AutoTokenizer.from_pretrained(str(roberta_files))
  assert type(hf).__name__.startswith("RobertaTokenizer")
  ref_ids, ref_mask = _reference(hf, 20)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)
  assert tok.pad_id == 1 and ids[3, 0] == 0 and ids[3, 1] == 2  # <s> </s> then <pad>


def test_pickles_without_the_rust_object_and_reloads(minilm_dir):
  tok = tokenizer_lib.Tokenizer(minilm_dir, max_len=16)
  copy = pickle.loads(pickle.dumps(tok))
  assert copy._tok is None  # pylint: disable=protected-access
  np.testing.assert_array_equal(copy(TEXTS)[0], tok(TEXTS)[0])


def test_missing_files_name_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    tokenizer_lib.Tokenizer(tmp_path, max_len=16)
