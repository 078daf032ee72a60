"""What each term of a trained HADE contributes: its learned weights, and T2A with each term alone.

  python -m tools.score_terms /work/runs/esc50_abl/full/seed_0 [more workdirs] [--split=test]
      [--out=terms.json]

For each run (its best checkpoint, loaded and verified by `api.Hade.load`) on a labels split of
a `dataset='folder'` config (ESC-50: every clip of the caption's class is relevant):

- the learned THA level weights (softmax of `heads.level_logits`), the logit scale exp(s) and,
  for 'attention' levels, each level's 1 / temperature;
- the mean DCR confidence c_k(a, t) over matching (same class) and other pairs, per factor;
- class-level T2A R@1/R@10 and mAP@10 of the total score and of each term alone (global,
  THA, each THA level, DCR): which part carries the retrieval and which one costs.

The split is the one evaluation reads (`data.eval_split`: its captions, clips and classes), so
the total's T2A equals the run's own test metrics. Pure evaluation: nothing is written except
--out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np


def _class_t2a(scores_AxT: np.ndarray, caption_clip_T, clip_group_A) -> dict[str, float]:
  from hade_jax import metrics

  m = metrics.retrieval_metrics(scores_AxT, caption_clip_T, clip_group_A=clip_group_A)
  return {k: m[f"t2a/{k}"] for k in ("R@1", "R@10", "mAP@10")}


def analyse(workdir: str, split: str) -> dict:
  """The learned weights and each term's T2A of one run's best checkpoint on `split`."""
  import jax
  import jax.numpy as jnp

  from hade_jax import api, data

  hade = api.Hade.load(workdir)
  heads, cfg = hade.model.heads, hade.model.heads.cfg
  s = data.eval_split(hade.config, data.open_dataset(hade.config, hade.model.cfg), split)
  if s.labels is None:
    raise SystemExit(f"{workdir}: split {split!r} has no labels (a labels folder config)")
  audio = hade.encoder.audio_batches(s.audio_batches(), s.clip_ids)
  text = hade.encoder.text(s.input_ids, s.attention_mask, hade.batch_size)
  parts = jax.device_get(heads.score(jax.tree.map(jnp.asarray, audio),
                                     jax.tree.map(jnp.asarray, text)))
  out = {"workdir": workdir, "split": split, "clips": len(s.clip_ids),
         "captions": len(s.texts), "logit_scale": float(heads.logit_scale_value()), "t2a": {}}
  terms = {"total": parts["total"], "global": parts["global"]}
  if cfg.use_tha:
    out["level_weights"] = np.asarray(heads.level_weights()).tolist()
    terms["tha"] = parts["tha"]
    for i, level in enumerate(cfg.levels):
      terms[f"level {tuple(level)}"] = parts["levels"][i]
    if cfg.level_sim == "attention":
      out["attention_scales"] = [float(x) for x in heads.attention_scales()]
  if cfg.use_dcr:
    terms["dcr"] = parts["dcr"]
    same_AxT = s.clip_group[:, None] == s.clip_group[s.caption_clip][None]
    conf_AxTxK = np.asarray(parts["confidence"])
    out["confidence"] = {"matching": conf_AxTxK[same_AxT].mean(0).tolist(),
                         "other": conf_AxTxK[~same_AxT].mean(0).tolist()}
  for name, s_AxT in terms.items():
    out["t2a"][name] = _class_t2a(np.asarray(s_AxT), s.caption_clip, s.clip_group)
  return out


def table(results: list[dict]) -> str:
  names = list(dict.fromkeys(n for r in results for n in r["t2a"]))
  lines = ["| run | " + " | ".join(f"{n} R@1 / mAP@10" for n in names) + " | level weights |"
           " confidence, matching / other pairs (mean over factors) |\n",
           "|---" * (len(names) + 3) + "|\n"]
  for r in results:
    cells = [f"{r['t2a'][n]['R@1']:.1f} / {r['t2a'][n]['mAP@10']:.1f}" if n in r["t2a"] else "-"
             for n in names]
    weights = " ".join(f"{w:.2f}" for w in r.get("level_weights", [])) or "-"
    conf = r.get("confidence")
    conf_s = (f"{np.mean(conf['matching']):.2f} / {np.mean(conf['other']):.2f}" if conf
              else "-")
    lines.append(f"| {r['workdir']} | " + " | ".join(cells) + f" | {weights} | {conf_s} |\n")
  return "".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--split", default="test")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  results = [analyse(w, args.split) for w in args.workdirs]
  print(table(results))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  sys.exit(main())
