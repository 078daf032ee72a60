"""The search engine behind `hade_jax.serve`: one model, one index, a queue of model calls.

Every call of the model (text queries, uploaded clips) goes through one worker thread, which
is the limit on concurrent model calls: requests wait in a bounded queue (full: `Busy`) and
the worker takes every text query waiting when it is free and embeds them in ONE encoder call,
so concurrent users share the encoder's batch instead of queueing behind each other. The
index stays as `search.Index` opened it: global embeddings in memory, tokens memory-mapped
(only the shortlisted rows are read).

Clips are named by their row in the index (a clip id); the files served are only those the
manifest records, resolved inside the index's audio folder (`paths.resolve_inside`).

Legend: N: corpus clips, Q: queries, D: joint width.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import queue
import threading
import time

import numpy as np

from data_pipelines import audio_io
from hade_jax import api, paths, search, thumbnails

log = logging.getLogger("hade_jax.serving")


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for; the server refuses more with a message naming the limit."""

  max_query_chars: int = 300  # a query's length (the tokenizer keeps max_text_len tokens)
  max_k: int = 100  # results per page
  max_results: int = 500  # offset + k: how deep paging may go
  shortlists: tuple[int, ...] = (100, 300, 1000, 3000)  # allowed --shortlist choices
  default_shortlist: int = 1000
  max_upload_bytes: int = 20 << 20  # an uploaded clip's size
  max_upload_seconds: float = 60.0  # an uploaded clip's decoded duration
  max_pending: int = 256  # model calls waiting; more is answered 503 (busy)
  max_batch: int = 32  # text queries embedded in one encoder call (at most 256)
  thumbnail_cache: int = 4096  # spectrogram thumbnails kept in memory

  def __post_init__(self):
    if not 1 <= self.max_batch <= 256:
      raise ValueError(f"Limits: max_batch {self.max_batch} must be between 1 and 256")
    if self.default_shortlist not in self.shortlists:
      raise ValueError(f"Limits: default_shortlist {self.default_shortlist} is not one of "
                       f"shortlists {self.shortlists}")


class RequestError(ValueError):
  """A request the server cannot answer (bad input: HTTP 400, or the status given)."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


class Busy(RequestError):
  def __init__(self, pending: int):
    super().__init__(f"the server is busy ({pending} model calls waiting); try again shortly",
                     503)


@dataclasses.dataclass
class _Job:
  kind: str  # 'text' (batched) or 'audio'
  payload: object  # the query text, or a [S] waveform
  future: concurrent.futures.Future
  queued: float


class Engine:
  """Search, similar clips, uploads, clip files and thumbnails of one index.

  Attributes:
    hade: the model the index was built with.
    index: the `search.Index`.
    limits: the `Limits` enforced.
  """

  def __init__(self, hade: api.Hade, index: search.Index, limits: Limits = Limits()):
    self.hade, self.index, self.limits = hade, index, limits
    self.searcher = hade.searcher(index)
    g_NxD = np.asarray(index.global_NxD, np.float32)
    self._unit_NxD = g_NxD / np.maximum(np.linalg.norm(g_NxD, axis=-1, keepdims=True), 1e-12)
    self.root = pathlib.Path(index.manifest["audio"]["root"])
    self._queue: queue.Queue[_Job | None] = queue.Queue()
    self._durations: dict[int, float | None] = {}
    self._thumbs: collections.OrderedDict[int, bytes] = collections.OrderedDict()
    self._thumb_lock = threading.Lock()
    self._worker = threading.Thread(target=self._work, name="hade-model", daemon=True)
    self._worker.start()

  def close(self) -> None:
    self._queue.put(None)
    self._worker.join(timeout=10)

  # -- the model queue -------------------------------------------------------------------------

  def _submit(self, kind: str, payload) -> concurrent.futures.Future:
    pending = self._queue.qsize()
    if pending >= self.limits.max_pending:
      raise Busy(pending)
    job = _Job(kind, payload, concurrent.futures.Future(), time.perf_counter())
    self._queue.put(job)
    return job.future

  def _work(self) -> None:
    deferred: list[_Job] = []
    while True:
      job = deferred.pop(0) if deferred else self._queue.get()
      if job is None:
        return
      batch = [job]
      # Everything waiting now joins this call: under load the batch grows by itself, alone a
      # query waits for nothing.
      while job.kind == "text" and len(batch) < self.limits.max_batch:
        try:
          more = self._queue.get_nowait()
        except queue.Empty:
          break
        if more is None:
          self._queue.put(None)
          break
        (batch if more.kind == "text" else deferred).append(more)
      try:
        results = self._run(batch)
      except Exception as e:  # noqa: BLE001 - handed to every waiting request
        for j in batch:
          j.future.set_exception(e)
        continue
      for j, result in zip(batch, results, strict=True):
        j.future.set_result(result)

  def _run(self, batch: list[_Job]) -> list:
    t0 = time.perf_counter()
    if batch[0].kind == "audio":
      feats = self.hade.embed_waves([batch[0].payload], 1)
      return [(np.asarray(feats.global_AxD)[0], {"model_ms": _ms(t0), "batch": 1,
                                                  "queue_ms": 1e3 * (t0 - batch[0].queued)})]
    text = self.hade.embed_text([j.payload[0] for j in batch])
    model_ms = _ms(t0)
    out = [None] * len(batch)
    for shortlist in sorted({j.payload[2] for j in batch}):
      group = [i for i, j in enumerate(batch) if j.payload[2] == shortlist]
      k = max(batch[i].payload[1] for i in group)
      # Padded (repeating the last query) to 1, 2 or a multiple of 4: a few compiled shapes
      # serve every batch size, and at most 3 padded queries are scored for nothing.
      size = _padded(len(group))
      sub = _rows_of(text, group + [group[-1]] * (size - len(group)))
      result = self.searcher.search(sub, k, shortlist)
      for g, i in enumerate(group):
        kk = batch[i].payload[1]
        out[i] = (result.rows_QxK[g][:kk], result.scores_QxK[g][:kk], {
            "model_ms": model_ms, "search_ms": _ms(t0) - model_ms, "batch": len(batch),
            "queue_ms": 1e3 * (t0 - batch[i].queued), "shortlist": result.shortlist})
    return out

  # -- requests --------------------------------------------------------------------------------

  def check_page(self, k: int, offset: int) -> int:
    """offset + k, the results a request needs, refused beyond the limits."""
    if not 1 <= k <= self.limits.max_k:
      raise RequestError(f"k={k}: results per page must be between 1 and {self.limits.max_k}")
    if offset < 0 or offset + k > self.limits.max_results:
      raise RequestError(f"offset={offset}, k={k}: paging stops at result "
                         f"{self.limits.max_results} (offset + k)")
    return offset + k

  def search_text(self, q: str, k: int, offset: int, shortlist: int | None
                  ) -> concurrent.futures.Future:
    """A future of (rows, scores, timings) of the offset + k best clips for the text `q`."""
    q = q.strip()
    if not q:
      raise RequestError("the query is empty: type what the sound is like")
    if len(q) > self.limits.max_query_chars:
      raise RequestError(f"the query has {len(q)} characters; at most "
                         f"{self.limits.max_query_chars} are accepted")
    shortlist = self.limits.default_shortlist if shortlist is None else shortlist
    if shortlist not in self.limits.shortlists:
      raise RequestError(f"shortlist={shortlist}: choose one of {list(self.limits.shortlists)}")
    return self._submit("text", (q, self.check_page(k, offset), shortlist))

  def nearest(self, g_D: np.ndarray, count: int, exclude: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cosines) of the clips whose global embedding is closest to `g_D`."""
    sims_N = self._unit_NxD @ (g_D / max(float(np.linalg.norm(g_D)), 1e-12))
    if exclude is not None:
      sims_N[exclude] = -np.inf
    count = min(count, len(sims_N) - (exclude is not None))
    top = np.argpartition(-sims_N, count - 1)[:count] if count > 0 else np.zeros(0, int)
    rows = top[np.lexsort((top, -sims_N[top]))]  # score descending, then row ascending
    return rows, sims_N[rows]

  def similar(self, clip: int, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """More like clip `clip`: the other clips by the cosine of their global embeddings."""
    row = self.check_clip(clip)
    return self.nearest(self._unit_NxD[row], self.check_page(k, offset), exclude=row)

  def decode_upload(self, data: bytes, filename: str, scratch: pathlib.Path) -> np.ndarray:
    """An uploaded clip -> the waveform the model sees, decoded as every file is
    (`audio_io.decode`, then the model's crop policy); errors name the upload."""
    if len(data) > self.limits.max_upload_bytes:
      raise RequestError(f"{filename}: {len(data)} bytes; uploads are limited to "
                         f"{self.limits.max_upload_bytes} bytes", 413)
    if not data:
      raise RequestError(f"{filename}: the upload is empty")
    suffix = pathlib.PurePath(filename).suffix.lower()
    path = scratch / f"upload{suffix if suffix in audio_io.AUDIO_EXTENSIONS else ''}"
    path.write_bytes(data)
    try:
      decoded = audio_io.decode(path, self.hade.sample_rate)
    except audio_io.AudioError as e:
      raise RequestError(f"{filename}: {e.reason}: {e.detail.replace(str(path), filename)}"
                         ) from None
    if decoded.seconds > self.limits.max_upload_seconds:
      raise RequestError(f"{filename}: {decoded.seconds:.1f} s long; uploads are limited to "
                         f"{self.limits.max_upload_seconds:g} s")
    return self.hade.load_audio(decoded.samples.astype(np.float32) / 32768.0,
                                self.hade.sample_rate)

  def embed_upload(self, wave: np.ndarray) -> concurrent.futures.Future:
    """A future of (global embedding [D], timings) of a decoded upload."""
    return self._submit("audio", wave)

  # -- clips -----------------------------------------------------------------------------------

  def check_clip(self, clip: int | str) -> int:
    """The row of a clip id; RequestError 404 for anything that is not one."""
    text = str(clip)
    if not text.isdigit() or not text.isascii() or int(text) >= len(self.index):
      raise RequestError(f"no clip {text[:40]!r} in this index (clip ids are 0 to "
                         f"{len(self.index) - 1})", 404)
    return int(text)

  def clip_path(self, clip: int | str) -> pathlib.Path:
    """The audio file of a clip: only a file the index records, inside its audio folder."""
    row = self.check_clip(clip)
    name = self.index.names[row]
    try:
      path = paths.resolve_inside(self.root, name, what=str(self.index.path / search.MANIFEST))
    except paths.PathOutsideError:
      raise RequestError(f"clip {row}: not served (its name leaves the audio folder)",
                         404) from None
    if not path.is_file():
      raise RequestError(f"clip {row} ({name}): the file is gone from {self.root}", 404)
    return path

  def duration(self, row: int) -> float | None:
    """Seconds of a clip's file, from its header (None: unreadable now)."""
    if row not in self._durations:
      try:
        self._durations[row] = audio_io.duration_seconds(self.clip_path(row))
      except (RequestError, audio_io.AudioError):
        self._durations[row] = None
    return self._durations[row]

  def thumbnail(self, clip: int | str) -> bytes:
    """A PNG spectrogram of the clip, rendered once and kept (least recently used dropped)."""
    row = self.check_clip(clip)
    with self._thumb_lock:  # one render at a time: a page of results asks for many at once
      if row in self._thumbs:
        self._thumbs.move_to_end(row)
        return self._thumbs[row]
      try:
        png = thumbnails.render(self.clip_path(row))
      except audio_io.AudioError as e:
        raise RequestError(f"clip {row}: no spectrogram ({e.reason})", 404) from None
      self._thumbs[row] = png
      if len(self._thumbs) > self.limits.thumbnail_cache:
        self._thumbs.popitem(last=False)
      return png

  def hits(self, rows: np.ndarray, scores: np.ndarray, offset: int) -> list[dict]:
    """The JSON of results `offset:` of ranked rows."""
    return [{"rank": offset + i + 1, "clip": int(r), "name": self.index.names[int(r)],
             "score": float(s), "duration": self.duration(int(r)),
             "audio": f"/audio/{int(r)}", "thumbnail": f"/thumbnail/{int(r)}"}
            for i, (r, s) in enumerate(zip(rows[offset:], scores[offset:], strict=True))]

  def warm_up(self) -> None:
    """Compiles the default search for each padded batch size (a first user would otherwise
    wait for the compiler)."""
    text = self.hade.embed_text(["warm up"])
    for q in sorted({_padded(n) for n in range(1, self.limits.max_batch + 1)}):
      self.searcher.search(_rows_of(text, [0] * q), 1, self.limits.default_shortlist)


def _padded(n: int) -> int:
  return n if n <= 2 else -(-n // 4) * 4


def _ms(t0: float) -> float:
  return 1e3 * (time.perf_counter() - t0)


def _rows_of(features, rows: list[int]):
  import jax

  return jax.tree.map(lambda x: np.asarray(x)[np.asarray(rows)], features)


def scratch_dir() -> pathlib.Path:
  """A private temporary folder for an upload (the caller removes it)."""
  import tempfile

  return pathlib.Path(tempfile.mkdtemp(prefix="hade_upload_", dir=os.environ.get("TMPDIR")))
