"""Text-to-audio search over a folder of audio files: a resumable on-disk index + queries.

  python -m hade_jax.search index --workdir=/tmp/hade_demo --audio_dir=~/sounds --out=~/idx
  python -m hade_jax.search query --index=~/idx "a dog barks while cars pass" [--k=10]
  python -m hade_jax.search verify --index=~/idx
  python -m hade_jax.search ann --index=~/idx [--kind=ivfpq --pq_bytes=32 --nprobe=64
                                              --refine=SQ8 --k_factor=20]

`index` embeds every audio file under `--audio_dir` (recursively; any format soundfile reads)
with a progress bar. The features each clip needs for the full HADE score (global embedding,
per-level tokens and token-weight logits, DCR factors) are appended in shards; a shard is
written to a temporary folder and renamed, then the manifest (`index.json`) is replaced
atomically, so an interrupted run loses at most the clips not yet in a shard, and running the
same command again continues where it stopped. Unreadable files are listed in the manifest and
skipped. The manifest also names the checkpoint, the model's config and a fingerprint of its
weights: queries load that model, and an index is never extended or queried with another.
Clips longer than the crop follow the config's `data.eval_crop` (stored in the settings):
with 'windows' a clip's levels hold every window's frames, so shards differ in frame count and
rows read from them are padded (masked) to the longest (docs/method.md section 9).

`query` is two-stage (docs/method.md section 6): the `--shortlist` clips with the best global cosine
(one matrix product over the in-memory global embeddings), then the full score on those clips
only (their tokens read from the memory-mapped shards). `--shortlist=0` scores every clip;
`--compare` runs both and reports how many of the exhaustive top k the two-stage search kept.

Several hosts: run the same command on every host (multi-process flags or environment, see
hade_jax/distributed.py). Every process decodes the same batches and the encoder splits each
batch over all devices of all hosts; process 0 alone writes the index. The audio folder (and,
for `query`, the index) must be readable on every host, e.g. a shared filesystem.

Re-running `index` on a folder that changed re-embeds the files whose size or modification
time differ from those recorded, drops the files that are gone, and reports how many were
added, changed and removed. Every shard file's size and sha256 are in the manifest: opening
an index checks sizes, the small files in full and the large arrays by a sampled hash, and
`verify` hashes everything; a damaged file is named in the error.

Large corpora: `ann` builds an approximate global-cosine shortlist (FAISS, hade_jax/ann.py:
IVF-PQ by default, or HNSW) over the index's global embeddings, saved as `ann.faiss` with its
size and sha256 in the manifest; `query` then uses it for stage 1 (`--nprobe` overrides the
cells scanned; `--exact` forces the exact shortlist). Re-run `ann` after the index changes: a
shortlist built for other shards is ignored with a warning. `ann.recommended(N)` says from which
size it pays (BENCHMARKS.md, "Search past 10^7 clips").

Index layout:
  index.json                       manifest (format, model, audio settings, shards with each
                                   file's size and sha256, skipped)
 ann.faiss                        the approximate shortlist (optional, `ann`)
  shards/000000/names.json         the shard's files, relative to the audio folder
  shards/000000/sources.json       each file's [size, mtime_ns] when it was embedded
  shards/000000/<feature>.npy      one array per feature, first axis = the shard's clips
  shards/000000/.hade_jax_shard    marks a folder the index wrote (only those are ever deleted)

Legend: N: corpus clips, Q: queries, K: results, D: joint width.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
from collections.abc import Sequence

import ml_collections
import numpy as np
import tqdm
from absl import flags

from data_pipelines import audio_io
from hade_jax import ann, api, cli, distributed, locking, metrics, paths, retrieval
from hade_jax import heads as hade_heads

log = logging.getLogger("hade_jax.search")

FORMAT = "hade_jax.index/1"
MANIFEST = "index.json"
# What the index creates under shards/: folders named by these patterns holding a marker file.
# Nothing else there is ever deleted (a user's own files may sit next to the shards).
SHARD_NAME = re.compile(r"^\d{6}$")
PARTIAL_SHARD_NAME = re.compile(r"^\.tmp-\d{6}$")
SHARD_MARKER = ".hade_jax_shard"
# Per shard: each row's audio file size and modification time, to notice changed files.
SOURCES = "sources.json"
# Files of a shard hashed in full every time the index is opened (they are read in full
# anyway); the memory-mapped token arrays are checked by size and a sampled hash on open
# and in full by `verify_index` (hashing runs at about 1 GB/s; see RELIABILITY.md).
_FULLY_HASHED_ON_OPEN = ("global.npy", "names.json", SOURCES)
_QUICK_BLOCK = 1 << 16
ANN_FILE = "ann.faiss"  # the approximate shortlist, next to the manifest
_QUICK_BLOCKS = 16


class DamagedIndexError(ValueError):
  """An index file is missing, truncated or altered since it was written (names the file)."""


def _digests(path: pathlib.Path) -> dict:
  """{'size', 'sha256' (all bytes), 'quick' (size + evenly spaced 64 KiB blocks)} of a file."""
  full = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      full.update(block)
  return {"size": path.stat().st_size, "sha256": full.hexdigest(), "quick": _quick_digest(path)}


def _quick_digest(path: pathlib.Path) -> str:
  """sha256 of the size and `_QUICK_BLOCKS` blocks spread over the file (head and tail
  included): catches truncation and most overwrites without reading a large file."""
  size = path.stat().st_size
  digest = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    for offset in sorted({min(i * size // _QUICK_BLOCKS, max(size - _QUICK_BLOCK, 0))
                          for i in range(_QUICK_BLOCKS + 1)}):
      f.seek(offset)
      digest.update(f.read(_QUICK_BLOCK))
  return digest.hexdigest()


def check_shard_file(path: pathlib.Path, record: dict, *, full: bool) -> str | None:
  """What is wrong with one shard file against its manifest record, or None."""
  if not path.is_file():
    return f"{path}: missing (the manifest lists it)"
  size = path.stat().st_size
  if size != record["size"]:
    return f"{path}: {size} bytes, the manifest recorded {record['size']} (truncated or replaced)"
  if full and _digests(path)["sha256"] != record["sha256"]:
    return f"{path}: sha256 differs from the manifest's (the file was altered)"
  if not full and _quick_digest(path) != record["quick"]:
    return f"{path}: sampled hash differs from the manifest's (the file was altered)"
  return None


# ---------------------------------------------------------------------------------------------
# Features <-> named arrays.


def flatten_features(f: hade_heads.AudioFeatures) -> dict[str, np.ndarray]:
  """Named arrays of audio features: global, level<i>, level<i>_mask, level<i>_logits, factors."""
  out = {"global": np.asarray(f.global_AxD)}
  for i, (x, m, w) in enumerate(zip(f.levels, f.level_masks, f.level_logits, strict=True)):
    out[f"level{i}"], out[f"level{i}_mask"], out[f"level{i}_logits"] = map(np.asarray, (x, m, w))
  if f.factors_AxKxd is not None:
    out["factors"] = np.asarray(f.factors_AxKxd)
  return out


def unflatten_features(arrays: dict[str, np.ndarray], num_levels: int
                       ) -> hade_heads.AudioFeatures:
  levels = range(num_levels)
  return hade_heads.AudioFeatures(
      arrays["global"], tuple(arrays[f"level{i}"] for i in levels),
      tuple(arrays[f"level{i}_mask"] for i in levels),
      tuple(arrays[f"level{i}_logits"] for i in levels), arrays.get("factors"))


def _atomic_write_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The index.


class Index:
  """An on-disk index: global embeddings in memory, everything else memory-mapped.

  Opening checks every shard file against the manifest: its size, a full sha256 of the
  files read in full (`global.npy`, `names.json`, `sources.json`) and a sampled hash of the
  memory-mapped arrays (`verify_index` hashes everything).

  Attributes:
    path: the index folder.
    manifest: the parsed `index.json`.
    names: the indexed files, relative to `manifest['audio']['root']`, in row order.
    sources: per indexed file, [size, mtime_ns] when it was embedded (None: an index written
      before they were recorded).
    changes: what the last `build_index` did: {'added', 'changed', 'removed'} file counts.
  """

  def __init__(self, path: str | os.PathLike, *, allow_symlinks_outside: bool = False):
    self.path = pathlib.Path(path).expanduser().absolute()
    self.allow_symlinks_outside = allow_symlinks_outside
    manifest_path = self.path / MANIFEST
    if not manifest_path.is_file():
      raise FileNotFoundError(f"no index at {self.path}: expected {manifest_path}; build one "
                              "with python -m hade_jax.search index --audio_dir=... "
                              f"--out={self.path}")
    try:
      self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
      raise DamagedIndexError(f"{manifest_path}: not a readable manifest ({e}); rebuild the "
                              "index") from e
    if self.manifest.get("format") != FORMAT:
      raise ValueError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected "
                       f"{FORMAT!r}")
    self._shards = []
    self.names: list[str] = []
    self.sources: dict[str, list[int] | None] = {}
    for shard in self.manifest["shards"]:
      arrays, names, sources = self._open_shard(shard)
      self._shards.append(arrays)
      self.names += names
      self.sources.update(zip(names, sources or [None] * len(names), strict=True))
    counts = [s["count"] for s in self.manifest["shards"]]
    self._offsets = np.cumsum([0] + counts)
    self._global = None
    self.changes = {"added": 0, "changed": 0, "removed": 0}

  def shard_folder(self, shard: dict) -> pathlib.Path:
    """The folder of a manifest shard entry, refused when it names anything but a shard."""
    name = str(shard.get("dir"))
    if not SHARD_NAME.match(name):
      raise paths.PathOutsideError(f"{self.path / MANIFEST}: shard dir {name!r} is not a shard "
                                   "name (six digits); the manifest was altered")
    return paths.resolve_inside(self.path / "shards", name, what=str(self.path / MANIFEST),
                                allow_symlinks_outside=self.allow_symlinks_outside)

  def _open_shard(self, shard: dict) -> tuple[dict, list[str], list | None]:
    folder = self.shard_folder(shard)
    for name, record in shard.get("files", {}).items():
      problem = check_shard_file(folder / name, record, full=name in _FULLY_HASHED_ON_OPEN)
      if problem:
        raise DamagedIndexError(f"{problem}; run python -m hade_jax.search verify "
                                f"--index={self.path}, then rebuild the index")
    arrays = {name: _load_array(folder / f"{name}.npy") for name in self.manifest["features"]}
    names = _load_json(folder / "names.json")
    sources = _load_json(folder / SOURCES) if (folder / SOURCES).is_file() else None
    bad = [f"{folder / (k + '.npy')}: {len(a)} rows" for k, a in arrays.items()
           if len(a) != shard["count"]]
    bad += [f"{folder / 'names.json'}: {len(names)} names"] if len(names) != shard["count"] else []
    if sources is not None and len(sources) != shard["count"]:
      bad.append(f"{folder / SOURCES}: {len(sources)} entries")
    if bad:
      raise DamagedIndexError(f"{'; '.join(bad)}: the manifest lists {shard['count']} clips "
                              "in this shard; rebuild this index")
    return arrays, names, sources

  @classmethod
  def create(cls, path: str | os.PathLike, *, model: dict, audio: dict,
             features: dict[str, dict]) -> Index:
    """An empty index at `path` (which must not hold one)."""
    path = pathlib.Path(path).expanduser().absolute()
    if (path / MANIFEST).exists():
      raise FileExistsError(f"{path} already holds an index")
    (path / "shards").mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path / MANIFEST, {
        "format": FORMAT, "model": model, "audio": audio, "features": features,
        "shards": [], "skipped": [], "num_clips": 0, "next_shard": 0})
    return cls(path)

  def __len__(self) -> int:
    return int(self._offsets[-1])

  @property
  def num_levels(self) -> int:
    return sum(1 for name in self.manifest["features"] if name.endswith("_mask"))

  @property
  def skipped(self) -> list[dict]:
    return self.manifest["skipped"]

  @property
  def global_NxD(self) -> np.ndarray:
    if self._global is None:
      d = self.manifest["features"]["global"]["shape"][-1]
      parts = [np.asarray(s["global"]) for s in self._shards]
      self._global = np.concatenate(parts) if parts else np.zeros((0, d), np.float32)
    return self._global

  def take(self, rows: np.ndarray) -> hade_heads.AudioFeatures:
    """The features of `rows` (any order, repeats allowed), read from the shards."""
    rows = np.asarray(rows, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
      raise IndexError(f"rows outside [0, {len(self)})")
    shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
    out = {}
    for name, spec in self.manifest["features"].items():
      # eval_crop 'windows': a shard's levels hold as many frames as its longest clip; rows
      # are zero-padded (masked) to the longest shard's, so every take has one shape.
      shape = np.max([spec["shape"]] + [s[name].shape[1:] for s in self._shards], axis=0)
      out[name] = np.zeros((len(rows), *shape), spec["dtype"])
    for s in np.unique(shard_of):
      sel = np.flatnonzero(shard_of == s)
      local = rows[sel] - self._offsets[s]
      for name, array in self._shards[s].items():
        out[name][sel, :array.shape[1]] = array[local]
    return unflatten_features(out, self.num_levels)

  def append(self, names: Sequence[str], features: hade_heads.AudioFeatures | None,
             skipped: Sequence[dict] = (), sources: Sequence[Sequence[int]] | None = None
             ) -> None:
    """Writes one shard (atomically: temporary folder, rename, then the manifest).

    `features` may be None when `names` is empty (only skipped files to record). `sources`:
    each file's [size, mtime_ns] when it was read.
    """
    arrays = flatten_features(features) if names else {}
    if names and set(arrays) != set(self.manifest["features"]):
      raise ValueError(f"features {sorted(arrays)} do not match the index's "
                       f"{sorted(self.manifest['features'])}")
    if any(len(a) != len(names) for a in arrays.values()):
      raise ValueError(f"{len(names)} names for features of {len(arrays['global'])} clips")
    manifest = dict(self.manifest)
    manifest["skipped"] = self.skipped + list(skipped)
    if len(names):
      shard = self._write_shard(arrays, list(names), sources)
      manifest["shards"] = self.manifest["shards"] + [shard]
      manifest["next_shard"] = int(shard["dir"]) + 1
      manifest["num_clips"] = len(self) + len(names)
    _atomic_write_json(self.path / MANIFEST, manifest)
    self.manifest = manifest
    if len(names):
      self._shards.append({k: np.load(self.shard_folder(shard) / f"{k}.npy", mmap_mode="r")
                           for k in arrays})
      self.names += list(names)
      self.sources.update(zip(names, sources or [None] * len(names), strict=True))
      self._offsets = np.append(self._offsets, self._offsets[-1] + len(names))
      self._global = None

  def _write_shard(self, arrays: dict[str, np.ndarray], names: list[str],
                   sources: Sequence[Sequence[int]] | None) -> dict:
    """Writes a shard folder (temporary name, then renamed); returns its manifest entry."""
    shards = self.manifest["shards"]
    number = self.manifest.get("next_shard", len(shards))  # indexes before 'next_shard'
    name = f"{number:06d}"
    tmp = self.path / "shards" / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / SHARD_MARKER).write_text("written by hade_jax.search\n", encoding="utf-8")
    for key, array in arrays.items():
      np.save(tmp / f"{key}.npy", array)
    (tmp / "names.json").write_text(json.dumps(names), encoding="utf-8")
    if sources is not None:
      (tmp / SOURCES).write_text(json.dumps([list(map(int, x)) for x in sources]),
                                 encoding="utf-8")
    files = {p.name: _digests(p) for p in sorted(tmp.iterdir()) if p.name != SHARD_MARKER}
    os.replace(tmp, self.path / "shards" / name)
    return {"dir": name, "count": len(names), "files": files}

  def drop(self, names: set[str]) -> int:
    """Removes the rows and skipped entries of `names`: each shard holding some is rewritten
    without them (a new shard, then the manifest, then the old folder is deleted). Returns
    the rows removed."""
    removed = 0
    for s in reversed(range(len(self.manifest["shards"]))):
      shard = self.manifest["shards"][s]
      start, stop = int(self._offsets[s]), int(self._offsets[s + 1])
      keep = [i for i in range(start, stop) if self.names[i] not in names]
      if len(keep) == stop - start:
        continue
      removed += stop - start - len(keep)
      manifest = dict(self.manifest)
      shards = list(manifest["shards"])
      if keep:
        rows = np.asarray(keep)
        new = self._write_shard(flatten_features(self.take(rows)),
                                [self.names[i] for i in keep],
                                [self.sources[self.names[i]] for i in keep]
                                if all(self.sources[self.names[i]] for i in keep) else None)
        shards[s] = new
        manifest["next_shard"] = int(new["dir"]) + 1
      else:
        del shards[s]
      manifest["shards"] = shards
      manifest["num_clips"] = sum(x["count"] for x in shards)
      _atomic_write_json(self.path / MANIFEST, manifest)
      self.manifest = manifest
      shutil.rmtree(self.shard_folder(shard))
      self.__init__(self.path, allow_symlinks_outside=self.allow_symlinks_outside)
    if any(x["file"] in names for x in self.skipped):  # tried again, or gone
      self.manifest = dict(self.manifest, skipped=[x for x in self.skipped
                                                   if x["file"] not in names])
      _atomic_write_json(self.path / MANIFEST, self.manifest)
    return removed

  def remove_partial_shards(self) -> list[str]:
    """Deletes the shard folders this index wrote that the manifest does not list (a run
    stopped mid-shard). Anything else under shards/ is left alone, with a warning."""
    listed = {s["dir"] for s in self.manifest["shards"]}
    ours = {SHARD_MARKER, "names.json", SOURCES} | {f"{k}.npy" for k in self.manifest["features"]}
    removed = []
    for folder in sorted((self.path / "shards").iterdir()):
      if folder.name in listed:
        continue
      made_here = (folder.is_dir() and not folder.is_symlink()
                   and (SHARD_NAME.match(folder.name) or PARTIAL_SHARD_NAME.match(folder.name))
                   and all(p.name in ours and p.is_file() for p in folder.iterdir()))
      if made_here:
        shutil.rmtree(folder)
        removed.append(folder.name)
      else:
        log.warning("%s is not a shard of this index; left alone", folder)
    return removed


def _load_array(path: pathlib.Path) -> np.ndarray:
  try:
    return np.load(path, mmap_mode="r")
  except (OSError, ValueError, EOFError) as e:
    raise DamagedIndexError(f"{path}: unreadable ({type(e).__name__}: {e}); rebuild the "
                            "index") from e


def _load_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise DamagedIndexError(f"{path}: unreadable ({type(e).__name__}: {e}); rebuild the "
                            "index") from e


def verify_index(path: str | os.PathLike) -> list[str]:
  """Every problem of the index at `path`, hashing every shard file in full; [] when sound."""
  path = pathlib.Path(path).expanduser().absolute()
  problems = []
  try:
    manifest = Index(path).manifest  # structure, sizes and the hashes checked on open
  except FileNotFoundError as e:
    return [str(e)]
  except ValueError as e:  # DamagedIndexError, PathOutsideError, a foreign format
    problems.append(str(e))
    try:
      manifest = _load_json(path / MANIFEST)
    except DamagedIndexError:
      return problems
  for shard in manifest.get("shards", []):
    if not SHARD_NAME.match(str(shard.get("dir"))):
      continue  # reported by the opening check
    folder = path / "shards" / shard["dir"]
    if "files" not in shard:
      problems.append(f"{folder}: no checksums recorded (an index from an older version); "
                      "rebuild it to make it verifiable")
      continue
    for name, record in shard["files"].items():
      problem = check_shard_file(folder / name, record, full=True)
      if problem and not any(problem in p for p in problems):  # once, not again in full
        problems.append(problem)
  if "ann" in manifest:
    problem = check_shard_file(path / ANN_FILE, manifest["ann"]["digests"], full=True)
    problems += [problem] if problem else []
  return problems


def feature_spec(features: hade_heads.AudioFeatures) -> dict[str, dict]:
  """Per feature: the shape of one clip's array and its dtype."""
  return {name: {"shape": list(a.shape[1:]), "dtype": str(a.dtype)}
          for name, a in flatten_features(features).items()}


def list_audio(audio_dir: str | os.PathLike) -> list[str]:
  """Audio files under `audio_dir` (recursively), relative POSIX paths in sorted order."""
  root = pathlib.Path(audio_dir).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"no audio folder at {root}")
  files = [p.relative_to(root).as_posix() for p in root.rglob("*")
           if p.is_file() and p.suffix.lower() in audio_io.AUDIO_EXTENSIONS]
  return sorted(files)


def model_record(hade: api.Hade) -> dict:
  return {"checkpoint": hade.checkpoint, "config": hade.config.to_dict(),
          "fingerprint": hade.fingerprint()}


def check_same_model(index: Index, hade: api.Hade) -> None:
  if index.manifest["model"]["fingerprint"] != hade.fingerprint():
    raise ValueError(
        f"the index {index.path} was built with the model of "
        f"{index.manifest['model']['checkpoint'] or '(in memory)'}, not with this one "
        f"({hade.checkpoint or '(in memory)'}): its features cannot be scored with it. Query it "
        "with its own model, or build a new index.")
  if index.manifest["audio"]["settings"] != hade.settings():
    raise ValueError(f"the index {index.path} was built with audio settings "
                     f"{index.manifest['audio']['settings']}, this model uses {hade.settings()}")


def build_index(hade: api.Hade, audio_dir: str | os.PathLike, out: str | os.PathLike, *,
                batch_size: int | None = None, shard_size: int = 1024, progress: bool = True,
                max_new_clips: int = 0, num_threads: int = 4) -> Index | None:
  """Embeds every audio file under `audio_dir` into the index at `out`, resuming it if present.

  Args:
    hade: the model (an existing index must have been built with the same weights).
    audio_dir: the folder of audio files (searched recursively).
    out: the index folder.
    batch_size: clips per encoder call (default config.eval_batch_size).
    shard_size: clips per shard (the unit of work an interruption can lose).
    progress: show a progress bar.
    max_new_clips: stop after this many new clips (0 = all), as if interrupted.
    num_threads: decoding threads.

  Returns:
    The index. On processes other than 0 (which only embed): the index as process 0 wrote it,
    or None when its folder is not visible from this host.
  """
  out = pathlib.Path(out).expanduser().absolute()
  out.mkdir(parents=True, exist_ok=True)
  # One writer per index: a second `index` on the same folder is refused naming the first.
  with locking.exclusive(out, "search index"):
    return _build_index(hade, audio_dir, out, batch_size=batch_size, shard_size=shard_size,
                        progress=progress, max_new_clips=max_new_clips, num_threads=num_threads)


def _build_index(hade: api.Hade, audio_dir: str | os.PathLike, out: pathlib.Path, *,
                 batch_size: int | None, shard_size: int, progress: bool, max_new_clips: int,
                 num_threads: int) -> Index | None:
  root = pathlib.Path(audio_dir).expanduser().absolute()
  files = list_audio(root)
  stats = file_stats(root, files)
  batch_size = batch_size or hade.batch_size
  # With several processes all of them embed (the encoder is one program over every device)
  # and process 0 writes; every process reads what is done before process 0 changes anything.
  writes = distributed.is_main_process()
  index, done, changed, removed = _open_for_build(hade, root, out, files, stats, writes)
  todo = [f for f in files if f not in done]
  if max_new_clips:
    todo = todo[:max_new_clips]
  changes = {"added": sum(f not in changed for f in todo), "changed": len(changed),
             "removed": len(removed)}
  log.info("index %s: %d clips or files done, %d to embed (%d new, %d changed since indexed), "
           "%d removed", out, len(done), len(todo), changes["added"], len(changed),
           len(removed))
  bar = tqdm.tqdm(total=len(done) + len(todo), initial=len(done), unit="clip",
                  disable=not (progress and writes), desc="indexing")
  names, feats, skipped = [], [], []

  def flush():
    if (names or skipped) and writes:
      index.append(names, retrieval.concat_features(feats) if feats else None, skipped,
                   sources=[stats[n] for n in names])
      names.clear()
      feats.clear()
      skipped.clear()

  try:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        waves, ok = [], []
        loaded = pool.map(lambda name: _load_or_error(hade, root / name), batch)
        for name, wave in zip(batch, loaded, strict=True):
          if isinstance(wave, audio_io.AudioError):
            log.warning("skipping %s", wave)
            skipped.append({"file": name, "reason": wave.reason, "detail": wave.detail,
                            "source": stats[name]})
          else:
            waves.append(wave)
            ok.append(name)
        if waves:
          feats.append(hade.embed_waves(waves, batch_size))
          # A damaged model gives NaN features, which would rank first in every query.
          metrics.check_finite_embeddings(feats[-1], ok, "audio")
          names.extend(ok)
        bar.update(len(batch))
        if len(names) >= shard_size:
          flush()
  finally:  # an interruption (Ctrl-C) still keeps what was embedded
    flush()
    bar.close()
  _sync_processes("hade_jax.search.index_written")
  if not writes:  # process > 0: the index as process 0 wrote it, if this host can see it
    index = Index(out) if (out / MANIFEST).is_file() else None
  if index is not None:
    index.changes = changes
  return index


def _load_or_error(hade: api.Hade, path: pathlib.Path) -> np.ndarray | audio_io.AudioError:
  try:
    return hade.load_audio(path)
  except audio_io.AudioError as e:
    return e


def _open_for_build(hade: api.Hade, root: pathlib.Path, out: pathlib.Path, files: list[str],
                    stats: dict[str, list[int]], writes: bool
                    ) -> tuple[Index | None, set[str], set[str], set[str]]:
  """(index, files done, changed, removed): the index at `out` resumed (unfinished shards
  and stale rows removed by the writing process) or created."""
  if not (out / MANIFEST).is_file():
    if not files:
      raise FileNotFoundError(f"no audio files ({', '.join(audio_io.AUDIO_EXTENSIONS)}) under "
                              f"{root}")
    probe = hade.embed_waves([np.zeros(hade.num_samples, np.float32)], 1)
    _sync_processes("hade_jax.search.read_index")
    index = None
    if writes:
      index = Index.create(out, model=model_record(hade), features=feature_spec(probe),
                           audio={"root": str(root), "settings": hade.settings()})
    return index, set(), set(), set()
  index = Index(out)
  check_same_model(index, hade)
  changed, removed = stale_files(index, stats)
  done = (set(index.names) | {s["file"] for s in index.skipped}) - changed - removed
  _sync_processes("hade_jax.search.read_index")
  if index.manifest["audio"]["root"] != str(root):
    log.warning("the index %s was started on %s; continuing with the files of %s", out,
                index.manifest["audio"]["root"], root)
  partial = index.remove_partial_shards() if writes else []
  if partial:
    log.warning("removed unfinished shard(s) %s of an interrupted run", partial)
  if writes and (changed or removed):
    index.drop(changed | removed)  # changed files are embedded again by the caller
  return index, done, changed, removed


def file_stats(root: pathlib.Path, files: Sequence[str]) -> dict[str, list[int]]:
  """[size, mtime_ns] of each file: recorded when it is embedded, compared when re-indexing."""
  out = {}
  for name in files:
    st = (root / name).stat()
    out[name] = [st.st_size, st.st_mtime_ns]
  return out


def stale_files(index: Index, stats: dict[str, list[int]]) -> tuple[set[str], set[str]]:
  """(changed, removed): files of the index (embedded or skipped) whose size or mtime differ
  from `stats`, and those no longer in the folder. Files indexed before sizes and times were
  recorded count as unchanged."""
  recorded = dict(index.sources)
  recorded |= {s["file"]: s.get("source") for s in index.skipped}
  removed = {n for n in recorded if n not in stats}
  changed = {n for n, r in recorded.items()
             if n in stats and r is not None and list(r) != stats[n]}
  return changed, removed


def _sync_processes(name: str) -> None:
  """A barrier across processes (nothing with one process)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# The approximate shortlist.


def _global_shards(index: Index):
  """Each shard's global embeddings [count, D] in row order, one shard read at a time."""
  for shard in index._shards:  # noqa: SLF001 (the index's own module)
    yield np.asarray(shard["global"], np.float32)


def build_ann(index: Index, cfg: ann.AnnConfig, seed: int = 0) -> ann.Shortlister:
  """Builds the approximate shortlist of `index` and records it in the manifest.

  Trained on a uniform sample of at most `cfg.train_size` clips, then every shard added in
  order; the file is written under a temporary name and renamed, then the manifest records its
  configuration, the shards it covers and its size and sha256.
  """
  n = len(index)
  if not n:
    raise ValueError(f"the index {index.path} holds no clips; run index first")
  rng = np.random.default_rng(seed)
  keep = min(1.0, cfg.train_size / n)
  sample = np.concatenate([g[rng.random(len(g)) < keep] for g in _global_shards(index)])
  if not len(sample):  # a tiny keep fraction drew nothing: take the first clips
    sample = next(_global_shards(index))
  with locking.exclusive(index.path, "search index"):
    shortlister = ann.Shortlister.build(sample, _global_shards(index), n, cfg)
    tmp = index.path / f".{ANN_FILE}.tmp"
    shortlister.save(tmp)
    digests = _digests(tmp)
    os.replace(tmp, index.path / ANN_FILE)
    index.manifest = dict(index.manifest, ann={
        "config": dataclasses.asdict(cfg), "num_clips": n, "digests": digests,
        "shards": [s["dir"] for s in index.manifest["shards"]]})
    _atomic_write_json(index.path / MANIFEST, index.manifest)
  return shortlister


def open_ann(index: Index, nprobe: int = 0) -> ann.Shortlister | None:
  """The index's approximate shortlist (`nprobe` cells scanned; 0: as built), or None when it
  has none or one built for other shards (a warning says to rebuild it)."""
  record = index.manifest.get("ann")
  if record is None:
    if ann.recommended(len(index)):
      log.info("%d clips: an approximate shortlist would be faster (python -m hade_jax.search "
               "ann --index=%s)", len(index), index.path)
    return None
  if record["shards"] != [s["dir"] for s in index.manifest["shards"]]:
    log.warning("the approximate shortlist of %s was built for %d clips before the index "
                "changed; using the exact shortlist. Rebuild it: python -m hade_jax.search ann "
                "--index=%s", index.path, record["num_clips"], index.path)
    return None
  path = index.path / ANN_FILE
  problem = check_shard_file(path, record["digests"], full=False)
  if problem:
    raise DamagedIndexError(f"{problem}; rebuild it with python -m hade_jax.search ann "
                            f"--index={index.path}")
  try:
    shortlister = ann.load(path, ann.AnnConfig(**record["config"]))
  except ValueError as e:
    raise DamagedIndexError(str(e)) from e
  shortlister.set_query_params(nprobe=nprobe)
  return shortlister


# ---------------------------------------------------------------------------------------------
# Queries.


def load_for_index(index: Index, config: ml_collections.ConfigDict | None = None) -> api.Hade:
  """The model an index was built with (its checkpoint, with the config saved in the index)."""
  model = index.manifest["model"]
  if not model.get("checkpoint"):
    raise ValueError(f"the index {index.path} was built with a model in memory; pass that "
                     "model (api.Hade) instead of loading one")
  config = config if config is not None else ml_collections.ConfigDict(model["config"])
  hade = api.Hade.load(model["checkpoint"], config)
  check_same_model(index, hade)
  return hade


def top_k_agreement(a: retrieval.SearchResult, b: retrieval.SearchResult) -> float:
  """Mean fraction of b's top k per query that a also returned (recall of a against b)."""
  found = [len(set(x.tolist()) & set(y.tolist())) / max(len(y), 1)
           for x, y in zip(a.rows_QxK, b.rows_QxK, strict=True)]
  return float(np.mean(found))


def query(hade: api.Hade, index: Index, queries: Sequence[str], *, k: int = 10,
          shortlist: int = 1000, compare: bool = False, repeat: int = 0, exact: bool = False,
          nprobe: int = 0) -> tuple[list[list[api.Hit]], dict]:
  """Runs the queries; returns (hits per query, timings and comparison).

  Stage 1 uses the index's approximate shortlist when it has one (`build_ann`; `nprobe` cells
  scanned, 0: as built), unless `exact`.

  With `repeat`, text embedding and search run that many more times and the timings are the
  median of those runs (without the first call's compilation).
  """
  def run():
    t0 = time.perf_counter()
    text = hade.embed_text(list(queries))
    t1 = time.perf_counter()
    if shortlist:
      result = searcher.search(text, k, shortlist)
    else:
      result = searcher.exhaustive(text, k, tile=hade.tile)
    return text, result, t1 - t0, time.perf_counter() - t1

  t0 = time.perf_counter()
  shortlister = open_ann(index, nprobe) if shortlist and not exact else None
  searcher = (retrieval.Searcher(hade.encoder, index, shortlister) if shortlister
              else hade.searcher(index))
  load_s = time.perf_counter() - t0
  text, result, embed_s, search_s = run()
  if repeat:
    times = np.array([run()[2:] for _ in range(repeat)])
    embed_s, search_s = np.median(times, axis=0)
  t3 = time.perf_counter()
  info = {"embed_ms": 1e3 * embed_s, "load_ms": 1e3 * load_s, "search_ms": 1e3 * search_s,
          "warm": bool(repeat), "shortlist": result.shortlist, "corpus": len(index),
          "stage1": shortlister.cfg.kind if shortlister else "exact"}
  if compare and shortlist:
    reference = searcher.exhaustive(text, k, tile=hade.tile)
    info["exhaustive_ms"] = 1e3 * (time.perf_counter() - t3)
    info["recall_vs_exhaustive"] = top_k_agreement(result, reference)
  hits = [[api.Hit(index.names[r], float(s), int(r)) for r, s in zip(rows, scores, strict=True)]
          for rows, scores in zip(result.rows_QxK, result.scores_QxK, strict=True)]
  return hits, info


def format_hits(queries: Sequence[str], hits: list[list[api.Hit]], info: dict) -> str:
  mode = (f"two-stage: {info['shortlist']} of {info['corpus']} clips ({info['stage1']} "
          "shortlist) re-ranked"
          if info["shortlist"] < info["corpus"] or info["stage1"] != "exact"
          else f"exhaustive over {info['corpus']} clips")
  when = ("median of repeated runs" if info["warm"]
          else "first call: includes compilation; --repeat=N times warm runs")
  lines = [f"{mode}; text {info['embed_ms']:.1f} ms, search {info['search_ms']:.1f} ms ({when})"]
  if "recall_vs_exhaustive" in info:
    lines.append(f"two-stage kept {100 * info['recall_vs_exhaustive']:.1f}% of the exhaustive "
                 f"top {len(hits[0])} (exhaustive search: {info['exhaustive_ms']:.1f} ms)")
  for q, query_hits in zip(queries, hits, strict=True):
    lines.append(f"\n{q}")
    lines += [f"{i + 1:4d}  {h.score:9.4f}  {h.name}" for i, h in enumerate(query_hits)]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


SUBCOMMAND_FLAGS = {  # besides --verbose and the multi-process flags, which both take
    "index": {"checkpoint", "workdir", "which", "config", "set", "audio_dir", "out",
              "batch_size", "shard_size", "no_progress"},
    "query": {"index", "k", "shortlist", "compare", "repeat", "exact", "nprobe"},
    "verify": {"index"},
    "ann": {"index", "kind", "nlist", "pq_bytes", "nprobe", "refine", "k_factor", "hnsw_m",
            "train_size"},
}


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_model_flags(fv, required=False)
  flags.DEFINE_string("audio_dir", None, "index: folder of audio files (recursive).",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "index: index folder (an existing one is resumed).",
                      flag_values=fv)
  flags.DEFINE_integer("batch_size", 0, "index: clips per encoder call (default "
                       "config.eval_batch_size).", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("shard_size", 1024, "index: clips per shard.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_bool("no_progress", False, "index: no progress bar.", flag_values=fv)
  flags.DEFINE_string("index", None, "query: the index folder.", flag_values=fv)
  flags.DEFINE_integer("k", 10, "query: results per query.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("shortlist", 1000, "query: clips re-ranked with the full score "
                       "(0 = exhaustive).", lower_bound=0, flag_values=fv)
  flags.DEFINE_bool("compare", False, "query: also run the exhaustive search and report the "
                    "recall kept.", flag_values=fv)
  flags.DEFINE_bool("exact", False, "query: the exact global-cosine shortlist even when the "
                    "index has an approximate one.", flag_values=fv)
  flags.DEFINE_integer("nprobe", 0, "query, ann: IVF cells scanned per query (0: ann's default; "
                       "query: as built).", lower_bound=0, flag_values=fv)
  flags.DEFINE_enum("kind", "ivfpq", list(ann.KINDS), "ann: the FAISS index.", flag_values=fv)
  flags.DEFINE_integer("nlist", 0, "ann: IVF cells (0: 4 sqrt(N)).", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_integer("pq_bytes", ann.AnnConfig.pq_bytes, "ann: PQ code bytes per clip.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_enum("refine", ann.AnnConfig.refine, list(ann.REFINES), "ann: the second code "
                    "per clip that re-orders the PQ candidates ('' for none).", flag_values=fv)
  flags.DEFINE_integer("k_factor", ann.AnnConfig.k_factor, "ann: PQ candidates re-ordered per "
                       "shortlisted clip (with --refine).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("hnsw_m", ann.AnnConfig.hnsw_m, "ann: HNSW links per clip (kind=hnsw).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("train_size", ann.AnnConfig.train_size, "ann: most clips trained on.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("repeat", 0, "query: run N more times and report the median (warm) "
                       "latency.", lower_bound=0, flag_values=fv)
  cli.define_distributed_flags(fv)


def parse_command(argv: Sequence[str] | None) -> tuple[str, flags.FlagValues, list[str]]:
  """(subcommand, flags, queries) of `index ...` / `query ... QUERY...`."""
  fv, rest = cli.parse(define_flags, argv, doc=__doc__, prog="python -m hade_jax.search")
  if not rest or rest[0] not in SUBCOMMAND_FLAGS:
    raise cli.UsageError("the first argument must be a subcommand, index, query, verify or ann; "
                         f"got {rest[0] if rest else 'none'} (see --help)")
  command, positional = rest[0], rest[1:]
  args = sys.argv[1:] if argv is None else argv
  given = {a[2:].partition("=")[0].partition(".")[0] for a in args if a.startswith("--")}
  other = set().union(*SUBCOMMAND_FLAGS.values()) - SUBCOMMAND_FLAGS[command]
  wrong = [f"--{name}" for name in sorted(other & given)]
  if wrong:
    raise cli.UsageError(f"{command} does not take {', '.join(wrong)}")
  if command == "index":
    missing = [f"--{name}" for name in ("audio_dir", "out") if not fv[name].value]
    if positional:
      raise cli.UsageError(f"index: unexpected arguments {positional}")
  else:
    missing = ["--index"] if not fv.index else []
    if command == "query" and not positional:
      missing.append("at least one text query")
    if command in ("verify", "ann") and positional:
      raise cli.UsageError(f"{command}: unexpected arguments {positional}")
  if missing:
    raise cli.UsageError(f"{command} needs {' and '.join(missing)}")
  return command, fv, positional


def main(argv: Sequence[str] | None = None):
  """Runs `index` or `query` as the command line says (argv without the program name)."""
  command, fv, queries = parse_command(argv)
  if command == "ann":
    index = Index(fv.index)
    cfg = ann.AnnConfig(kind=fv.kind, nlist=fv.nlist, pq_bytes=fv.pq_bytes,
                        nprobe=fv.nprobe or ann.AnnConfig.nprobe, refine=fv.refine,
                        k_factor=fv.k_factor, hnsw_m=fv.hnsw_m, train_size=fv.train_size)
    shortlister = build_ann(index, cfg)
    print(f"index {index.path}: {cfg.kind} shortlist of {len(shortlister)} clips "
          f"({shortlister.code_bytes_per_clip():.0f} bytes per clip) in {index.path / ANN_FILE}")
    return shortlister
  if command == "verify":
    problems = verify_index(fv.index)
    print("\n".join(problems) if problems else f"index {fv.index}: every file verified")
    if problems:
      raise SystemExit(1)
    return problems
  cli.setup_logging()
  cli.start_distributed(fv)
  if command == "index":
    out = pathlib.Path(fv.out).expanduser()
    checkpoint, config = fv.checkpoint, None
    if (out / MANIFEST).is_file() and not checkpoint:
      model = Index(out).manifest["model"]
      checkpoint, config = model["checkpoint"], ml_collections.ConfigDict(model["config"])
    if not checkpoint:
      raise cli.UsageError("a new index needs --checkpoint (or --workdir)")
    fv.checkpoint = checkpoint
    config = cli.model_config(fv) or config
    hade = api.Hade.load(checkpoint, config, which=fv.which)
    index = build_index(hade, fv.audio_dir, out, batch_size=fv.batch_size or None,
                        shard_size=fv.shard_size, progress=not fv.no_progress)
    if distributed.is_main_process():
      print(f"index {index.path}: {len(index)} clips, {len(index.skipped)} skipped "
            "({added} added, {changed} changed, {removed} removed)".format(**index.changes))
    return index
  index = Index(fv.index)
  hade = load_for_index(index)
  hits, info = query(hade, index, queries, k=fv.k, shortlist=fv.shortlist,
                     compare=fv.compare, repeat=fv.repeat, exact=fv.exact, nprobe=fv.nprobe)
  if distributed.is_main_process():
    print(format_hits(queries, hits, info))
  return hits


def run() -> None:
  """The console script (setup.py); the same as `python -m` of this module."""
  cli.main_entry(main)


if __name__ == "__main__":
  run()
