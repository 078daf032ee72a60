"""The report's figures (matplotlib, the `report` extra), each returned as PNG bytes.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot): no global state, no
display needed, and nothing left open between reports.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

_DPI = 110
_WIDTH = 9.0  # inches: two panels side by side read well at this size in a browser


def _png(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
  return buf.getvalue()


def _plot_lines(ax, series: dict[str, tuple[np.ndarray, np.ndarray]], strip: str) -> None:
  for name, (steps, values) in series.items():
    # A single point (one logged step) shows as a marker, not an invisible line.
    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3,
            label=name.removeprefix(strip))
  ax.set_xlabel("step")
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  if series:
    ax.legend(fontsize="small")


def training_curves(losses: dict, learning_rates: dict) -> bytes:
  """Loss terms (left) and each optimizer group's learning rate (right) over steps."""
  fig = Figure(figsize=(_WIDTH, 3.4))
  ax_loss, ax_lr = fig.subplots(1, 2)
  _plot_lines(ax_loss, losses, "train/")
  ax_loss.set_title("training loss terms")
  _plot_lines(ax_lr, learning_rates, "train/lr/")
  ax_lr.set_title("learning rate by parameter group")
  ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
  return _png(fig)


def validation_recalls(recalls: dict) -> bytes:
  """Validation R@k over steps, one panel per direction (T2A, A2T)."""
  fig = Figure(figsize=(_WIDTH, 3.4))
  axes = fig.subplots(1, 2, sharey=True)
  for ax, direction in zip(axes, ("t2a", "a2t"), strict=True):
    # R@1, R@5, R@10 in the order of k (not of the names).
    mine = sorted((k for k in recalls if f"/{direction}/" in k),
                  key=lambda k: int(k.rsplit("@", 1)[-1]))
    _plot_lines(ax, {k: recalls[k] for k in mine}, f"val/{direction}/")
    ax.set_title(f"validation {direction.upper()} recall (%)")
  return _png(fig)


def level_weights(names: list[str], weights_L: np.ndarray, learned: bool) -> bytes:
  """THA level weights lambda (softmax of the learned logits) against the uniform 1/L."""
  fig = Figure(figsize=(_WIDTH * 0.6, 3.0))
  ax = fig.subplots()
  x = np.arange(len(names))
  ax.bar(x, weights_L, color="tab:blue")
  ax.axhline(1.0 / len(names), color="grey", linestyle="--", label="uniform 1/L")
  ax.set_xticks(x, names, fontsize="small")
  ax.set_ylabel("weight")
  ax.set_title("THA level weights" + ("" if learned else " (fixed: learn_level_weights off)"))
  ax.legend(fontsize="small")
  return _png(fig)


def confidence(matched_PxK: np.ndarray, unmatched_PxK: np.ndarray) -> bytes:
  """DCR confidence c_k(a, t): its distribution over matched and unmatched pairs (left) and
  its mean per factor k (right)."""
  fig = Figure(figsize=(_WIDTH, 3.4))
  ax_hist, ax_k = fig.subplots(1, 2)
  both = np.concatenate([matched_PxK.ravel(), unmatched_PxK.ravel()])
  bins = np.linspace(both.min(), both.max() + 1e-6, 40)
  for values, label, color in ((unmatched_PxK, "unmatched pairs", "tab:grey"),
                               (matched_PxK, "matched pairs", "tab:orange")):
    ax_hist.hist(values.ravel(), bins=bins, density=True, alpha=0.6, label=label, color=color)
  ax_hist.set_xlabel("confidence c_k")
  ax_hist.set_ylabel("density")
  ax_hist.set_title("DCR confidence, all factors")
  ax_hist.legend(fontsize="small")
  k = np.arange(matched_PxK.shape[1])
  ax_k.bar(k - 0.2, unmatched_PxK.mean(0), width=0.4, label="unmatched", color="tab:grey")
  ax_k.bar(k + 0.2, matched_PxK.mean(0), width=0.4, label="matched", color="tab:orange")
  ax_k.set_xticks(k)
  ax_k.set_xlabel("factor k")
  ax_k.set_title("mean confidence per factor")
  ax_k.legend(fontsize="small")
  return _png(fig)
