"""Text tokenisation for the text tower, from the tower's own tokenizer files (a local folder).

Reads `tokenizer.json` (HF `tokenizers` format) when the folder has one; otherwise builds the
tokenizer from the classic files: `vocab.txt` (BERT WordPiece, lower-casing per
`tokenizer_config.json`'s `do_lower_case`) or `vocab.json` + `merges.txt` (RoBERTa byte-level
BPE). Output is fixed-shape numpy: int32 ids and mask [T, M], special tokens included,
truncated then right-padded to `max_len` (M).

Any text gives the fixed-shape output: empty, very long (truncated, the final [SEP] kept),
emoji, control characters (the normaliser drops them) or lone surrogates (replaced by U+FFFD,
as they cannot be encoded). `bytes` are decoded as UTF-8, invalid bytes replaced by U+FFFD.
Every row: ids[0] is [CLS] (<s>), the mask is L ones then zeros (2 <= L <= M), ids[L-1] is
[SEP] (</s>), ids[L:] are the pad id. Anything else than str/bytes is a TypeError naming it.

Picklable (Grain worker processes receive it): only the folder and settings are pickled; the
tokenizer is rebuilt on first use in each process.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

# Every file `Tokenizer` may read from its folder (what a portable model folder carries).
FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
         "special_tokens_map.json")


class Tokenizer:
  """Fixed-length tokenizer over a text tower's tokenizer files.

  Attributes:
    path: the folder.
    max_len: M, tokens per text including [CLS]/[SEP] (or <s>/</s>).
  """

  def __init__(self, path: os.PathLike | str, max_len: int):
    self.path = pathlib.Path(path)
    self.max_len = int(max_len)
    if self.max_len < 2:
      raise ValueError(f"max_len must leave room for the special tokens, got {max_len}")
    self._tok: tokenizers.Tokenizer | None = None
    self._pad_id: int | None = None
    self._load()  # fail now, with the folder in the message, not in a worker

  def __getstate__(self):
    return {"path": self.path, "max_len": self.max_len}

  def __setstate__(self, state):
    self.path, self.max_len = state["path"], state["max_len"]
    self._tok, self._pad_id = None, None

  @property
  def pad_id(self) -> int:
    self._load()
    return self._pad_id

  @property
  def vocab_size(self) -> int:
    return self._load().get_vocab_size(with_added_tokens=True)

  def _config(self) -> dict:
    merged = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
      f = self.path / name
      if f.is_file():
        merged.update(json.loads(f.read_text(encoding="utf-8")))
    return merged

  def _load(self) -> tokenizers.Tokenizer:
    if self._tok is not None:
      return self._tok
    config = self._config()
    if (self.path / "tokenizer.json").is_file():
      tok = tokenizers.Tokenizer.from_file(str(self.path / "tokenizer.json"))
    elif (self.path / "vocab.txt").is_file():
      tok = _wordpiece(self.path / "vocab.txt", config)
    elif (self.path / "vocab.json").is_file() and (self.path / "merges.txt").is_file():
      tok = _byte_level_bpe(self.path / "vocab.json", self.path / "merges.txt", config)
    else:
      raise FileNotFoundError(
          f"no tokenizer files in {self.path}: expected tokenizer.json, vocab.txt (BERT) or "
          "vocab.json + merges.txt (RoBERTa); point the text tower's tokenizer path at the "
          "folder of the checkpoint")
    pad = _token_text(config.get("pad_token"))
    if pad is None and tok.padding is not None:
      pad = tok.padding.get("pad_token")
    pad_id = tok.token_to_id(pad) if pad else None
    if pad_id is None:
      pad_id = next((tok.token_to_id(t) for t in ("[PAD]", "<pad>")
                     if tok.token_to_id(t) is not None), 0)
    tok.enable_truncation(self.max_len)
    tok.enable_padding(length=self.max_len, pad_id=pad_id,
                       pad_token=tok.id_to_token(pad_id) or "[PAD]")
    self._tok, self._pad_id = tok, pad_id
    return tok

  def __call__(self, texts: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises texts into (input_ids int32 [T, M], attention_mask int32 [T, M]).

    Raises:
      TypeError: `texts` is a single str/bytes (a sequence of texts is expected: use
        `encode_one` for one text), or an item is neither str nor bytes (naming its index).
    """
    if isinstance(texts, str | bytes | bytearray):
      raise TypeError(f"Tokenizer expects a sequence of texts, got one {type(texts).__name__} "
                      f"({texts[:40]!r}...); use encode_one(text) or pass [text]")
    texts = [_as_text(t, i) for i, t in enumerate(texts)]
    encodings = self._load().encode_batch(texts)
    ids_TxM = np.array([e.ids for e in encodings], dtype=np.int32).reshape(-1, self.max_len)
    mask_TxM = np.array([e.attention_mask for e in encodings],
                        dtype=np.int32).reshape(-1, self.max_len)
    return ids_TxM, mask_TxM

  def encode_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """One text: (input_ids int32 [M], attention_mask int32 [M]) (TypeError if not str/bytes)."""
    e = self._load().encode(_as_text(text, None))
    return np.asarray(e.ids, dtype=np.int32), np.asarray(e.attention_mask, dtype=np.int32)


def _as_text(text, index: int | None) -> str:
  """A str the Rust tokenizer accepts: bytes decoded as UTF-8, lone surrogates replaced."""
  if isinstance(text, bytes | bytearray):
    return bytes(text).decode("utf-8", errors="replace")
  if not isinstance(text, str):
    where = "text" if index is None else f"texts[{index}]"
    raise TypeError(f"{where} is a {type(text).__name__} ({text!r:.60}), expected str or bytes")
  if text.isascii():
    return str(text)
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    # Lone surrogates (from surrogateescape'd file names or JSON '\ud83d'): pairs are joined,
    # the rest become U+FFFD.
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", errors="replace")
  return str(text)


def _token_text(token) -> str | None:
  # tokenizer_config.json may hold a token as a plain string or as an AddedToken dict.
  if isinstance(token, dict):
    return token.get("content")
  return token


def _wordpiece(vocab: pathlib.Path, config: dict) -> tokenizers.Tokenizer:
  """BERT's tokenizer as `BertTokenizerFast` builds it from vocab.txt."""
  unk = _token_text(config.get("unk_token")) or "[UNK]"
  cls = _token_text(config.get("cls_token")) or "[CLS]"
  sep = _token_text(config.get("sep_token")) or "[SEP]"
  tok = tokenizers.Tokenizer(models.WordPiece.from_file(str(vocab), unk_token=unk))
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
      strip_accents=config.get("strip_accents"),
      lowercase=config.get("do_lower_case", True))
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
      special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
  tok.decoder = decoders.WordPiece()
  _add_specials(tok, config, ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token"),
                {"[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"})
  return tok


def _byte_level_bpe(vocab: pathlib.Path, merges: pathlib.Path,
                    config: dict) -> tokenizers.Tokenizer:
  """RoBERTa's tokenizer as `RobertaTokenizerFast` builds it from vocab.json + merges.txt."""
  bos = _token_text(config.get("bos_token")) or "<s>"
  eos = _token_text(config.get("eos_token")) or "</s>"
  add_prefix_space = config.get("add_prefix_space", False)
  tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.RobertaProcessing(
      (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)),
      add_prefix_space=add_prefix_space, trim_offsets=True)
  _add_specials(tok, config, ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"),
                {"<s>", "</s>", "<unk>", "<pad>", "<mask>"})
  return tok


def _add_specials(tok: tokenizers.Tokenizer, config: dict, keys: tuple[str, ...],
                  defaults: set[str]) -> None:
  """Registers the special tokens the classic vocab files list as ordinary entries.

  Keeps a literal "[SEP]" or "<mask>" in a caption from being split into pieces, as
  transformers 5 does when it builds these tokenizers from the same files.
  """
  names = {_token_text(config.get(k)) for k in keys} | defaults
  added = [tokenizers.AddedToken(t, special=True)
           for t in sorted(n for n in names if n and tok.token_to_id(n) is not None)]
  tok.add_special_tokens(added)
