"""An approximate global-cosine shortlist (FAISS) for corpora where the exact one is too slow.

Stage 1 of two-stage search (`retrieval.Searcher`) is by default exact: every clip's normalised
global embedding on the device, one matrix product and a top-k per query. Its cost and memory
grow with the corpus (4 bytes x 256 per clip: 10 GB at 10^7 clips). This module owns the
approximate alternative, an inner-product FAISS index over the same normalised embeddings:

- 'ivfpq' (default for large corpora): an inverted file of `nlist` cells (k-means centres;
  default 4 sqrt(N)) holding each clip as a product-quantisation code of `pq_bytes` bytes; a
  query scans the clips of its `nprobe` nearest cells (a query-time setting). Above
  `HNSW_QUANTIZER_FROM` cells the cells are found by an HNSW graph over the centres, because
  adding 10^7 clips against 12,000 centres by brute force costs ~10^14 FLOP.
  The shortlist is then refined (`refine`, default 'SQ8'): FAISS takes `k_factor` x S
  candidates by their PQ similarity and re-orders them by a second, finer code of every clip
  (8-bit scalar quantisation: 1 byte per dimension, 256 B per clip at D=256). At 10^7 clips
  the 32-byte PQ codes alone cannot tell apart the near-ties of a dense cluster: re-ranking
  even 1,000 of them by the exact cosine kept 93.8 % of the exact top 10; with the refine
  (nprobe 64, k_factor 20) a shortlist of 100 keeps 95.1 % in 6 ms (BENCHMARKS.md).
- 'hnsw': a graph over the full float32 embeddings (`hnsw_m` links per clip; `ef_search` at
  query time): more accurate and memory-hungry (over 1 KB per clip), optional.

`recommended(n)` is the one rule for when to use it (benchmarks/ann_search.py measured the
crossover). Training uses a sample of at most `train_size` clips; clips are added in chunks,
so the corpus never has to be in memory at once.

Legend: N: corpus clips, Q: queries, S: shortlist, D: joint width.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable

import numpy as np

KINDS = ("ivfpq", "hnsw")
REFINES = ("", "SQ8", "SQfp16", "Flat")  # ivfpq refinement codes ('': none), FAISS's names
# Where the exact shortlist stops winning (BENCHMARKS.md, "Search past 10^7 clips"): it loses
# nothing, and below ~10^5 clips it costs less than the full re-ranking of its S=100 clips
# (quiet 2 cores: 5 ms at 10^5, 17 ms at 3 x 10^5, 54 ms at 10^6, against 8 ms of
# re-ranking), while IVF-PQ answers in ~1 ms keeping 98-99.8 % of the exact top 10 at
# 10^5-10^6. So exact below 10^5.
EXACT_BELOW = 100_000
HNSW_QUANTIZER_FROM = 8192  # cells from which an HNSW graph finds a clip's cell (see above)


@dataclasses.dataclass(frozen=True)
class AnnConfig:
  """The FAISS index's choice and parameters.

  Attributes:
    kind: 'ivfpq' or 'hnsw'.
    nlist: ivfpq cells (0: 4 sqrt(N), at least 1 and at most N / 39, FAISS's clips per centre).
    pq_bytes: ivfpq bytes per clip code (a divisor of the width D: D / pq_bytes dims per byte;
      corpora under 256 clips get fewer bits per sub-vector).
    nprobe: ivfpq cells scanned per query (query time: more = slower, higher recall).
    refine: ivfpq's second code per clip that re-orders the PQ candidates (one of REFINES;
      '' for none): 'SQ8' 1 byte per dimension, 'SQfp16' 2, 'Flat' the float32 vector.
    k_factor: ivfpq with refine: candidates per shortlisted clip re-ordered (query time).
    hnsw_m: hnsw links per clip.
    ef_search: hnsw candidates kept while searching (query time), at least the shortlist.
    train_size: most clips the k-means centres and PQ codebooks are trained on.
  """

  kind: str = "ivfpq"
  nlist: int = 0
  pq_bytes: int = 32
  nprobe: int = 64  # 10^7 clips: 64 keeps 95.1 % of the exact top 10, 16 only 94.2 %
  refine: str = "SQ8"
  k_factor: int = 20
  hnsw_m: int = 32
  ef_search: int = 128
  train_size: int = 200_000

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"ann kind {self.kind!r}: choose one of {', '.join(KINDS)}")
    if self.refine not in REFINES:
      raise ValueError(f"ann refine {self.refine!r}: choose one of "
                       f"{', '.join(repr(r) for r in REFINES)}")
    for name in ("pq_bytes", "nprobe", "k_factor", "hnsw_m", "ef_search", "train_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"ann {name}={getattr(self, name)}: must be at least 1")

  def cells(self, n: int) -> int:
    """ivfpq cells for a corpus of n clips."""
    return self.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))


def recommended(n: int) -> str | None:
  """The shortlist kind for a corpus of n clips: None (exact) below `EXACT_BELOW`, else 'ivfpq'."""
  return None if n < EXACT_BELOW else "ivfpq"


def _faiss():
  try:
    import faiss
  except ImportError as e:
    raise ImportError("the approximate shortlist needs FAISS: pip install 'hade_jax[ann]' "
                      "(faiss-cpu)") from e
  return faiss


def normalized(x_NxD: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length, float32 C-contiguous (what FAISS takes); zero rows stay zero."""
  x = np.asarray(x_NxD, np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return np.ascontiguousarray(x / np.maximum(norm, 1e-12))


def factory_string(cfg: AnnConfig, n: int, d: int) -> str:
  """The FAISS index_factory description of `cfg` for n clips of width d."""
  if cfg.kind == "hnsw":
    return f"HNSW{cfg.hnsw_m},Flat"
  if d % cfg.pq_bytes:
    raise ValueError(f"ann pq_bytes={cfg.pq_bytes} does not divide the embedding width {d}")
  cells = cfg.cells(n)
  quantizer = "_HNSW32" if cells >= HNSW_QUANTIZER_FROM else ""
  # 8-bit codes (256 centres per sub-vector) need 256 training clips; fewer get fewer bits.
  bits = min(8, max(1, int(math.log2(max(2, min(n, cfg.train_size))))))
  refine = f",Refine({cfg.refine})" if cfg.refine else ""
  return f"IVF{cells}{quantizer},PQ{cfg.pq_bytes}x{bits}{refine}"


class Shortlister:
  """A FAISS index of a corpus's normalised global embeddings; row i is the corpus's clip i."""

  def __init__(self, index, cfg: AnnConfig):
    self.index, self.cfg = index, cfg
    self.set_query_params(cfg.nprobe, cfg.ef_search)

  def __len__(self) -> int:
    return int(self.index.ntotal)

  def _refine(self):
    """The FAISS IndexRefine wrapping the IVF-PQ index, or None (no refinement)."""
    faiss = _faiss()
    index = faiss.downcast_index(self.index)
    return index if isinstance(index, faiss.IndexRefine) else None

  def set_query_params(self, nprobe: int | None = None, ef_search: int | None = None,
                       k_factor: int | None = None) -> None:
    """The query-time settings: ivfpq cells scanned and refined candidates per result, hnsw
    candidates kept."""
    faiss = _faiss()
    if nprobe:
      self.cfg = dataclasses.replace(self.cfg, nprobe=nprobe)
    if ef_search:
      self.cfg = dataclasses.replace(self.cfg, ef_search=ef_search)
    if k_factor:
      self.cfg = dataclasses.replace(self.cfg, k_factor=k_factor)
    refine = self._refine()
    if refine is not None:
      refine.k_factor = float(self.cfg.k_factor)
    if self.cfg.kind == "ivfpq":
      ivf = faiss.extract_index_ivf(self.index)
      ivf.nprobe = min(self.cfg.nprobe, ivf.nlist)
      quantizer = faiss.downcast_index(ivf.quantizer)
      if isinstance(quantizer, faiss.IndexHNSW):  # must keep at least the cells it returns
        quantizer.hnsw.efSearch = max(2 * ivf.nprobe, 64)
    else:
      faiss.downcast_index(self.index).hnsw.efSearch = self.cfg.ef_search

  @classmethod
  def build(cls, sample_NxD: np.ndarray, chunks: Iterable[np.ndarray], n: int, cfg: AnnConfig
            ) -> Shortlister:
    """Trains on `sample_NxD` (at most cfg.train_size rows are used), then adds `chunks`
    (the corpus's global embeddings in row order, n rows in all; normalised here)."""
    faiss = _faiss()
    d = sample_NxD.shape[1]
    index = faiss.index_factory(d, factory_string(cfg, n, d), faiss.METRIC_INNER_PRODUCT)
    sample = normalized(sample_NxD[:cfg.train_size])
    if cfg.kind == "ivfpq":
      ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
      # Polysemous codes only serve Hamming pre-filtering, which search does not use, and
      # train for minutes; 10 k-means rounds for the codebooks (FAISS: 25) bound training time.
      ivf.do_polysemous_training = False
      ivf.pq.cp.niter = 10
    if not index.is_trained:
      index.train(sample)
    for chunk in chunks:
      index.add(normalized(chunk))
    if index.ntotal != n:
      raise ValueError(f"ann build: {index.ntotal} clips added, the corpus holds {n}")
    return cls(index, cfg)

  def search(self, t_QxD: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """([Q, S] rows, [Q, S] approximate cosines), best first, S = min(size, N).

    A query whose scanned cells hold fewer than S clips is searched again with 4x the cells
    (ivfpq) or candidates (hnsw) until it has S, so every row is a clip.
    """
    size = min(size, len(self))
    t = normalized(t_QxD)
    sims, rows = self.index.search(t, size)
    missing = np.flatnonzero((rows < 0).any(axis=1))
    saved = self.cfg
    grow = 1
    try:
      while len(missing):
        grow *= 4
        if grow > 4**10:  # every cell probed long before: the index is not the corpus's
          raise RuntimeError(f"the FAISS index of {len(self)} clips returned fewer than {size}")
        self.set_query_params(saved.nprobe * grow, max(saved.ef_search, size) * grow)
        sims[missing], rows[missing] = self.index.search(t[missing], size)
        missing = missing[(rows[missing] < 0).any(axis=1)]
    finally:
      self.set_query_params(saved.nprobe, saved.ef_search)
    return rows.astype(np.int64), sims

  def code_bytes_per_clip(self) -> float:
    """Bytes per clip of the index in memory: codes, ids and graph links (not the centres)."""
    if self.cfg.kind == "ivfpq":  # the code and the clip's int64 id in its list, the refine code
      refine = self._refine()
      extra = refine.refine_index.sa_code_size() if refine is not None else 0
      return float(_faiss().extract_index_ivf(self.index).code_size + 8 + extra)
    d = self.index.d
    return 4.0 * d + 4.0 * 2 * self.cfg.hnsw_m  # the float32 vector and its level-0 links

  def save(self, path: str | os.PathLike) -> None:
    _faiss().write_index(self.index, os.fspath(path))


def load(path: str | os.PathLike, cfg: AnnConfig) -> Shortlister:
  """The shortlister saved at `path`; an unreadable file is named in the error."""
  faiss = _faiss()
  try:
    index = faiss.read_index(os.fspath(path))
  except RuntimeError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path}: not a readable FAISS index ({first}); rebuild it with "
                     "python -m hade_jax.search ann") from e
  return Shortlister(index, cfg)
