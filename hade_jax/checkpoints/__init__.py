"""Everything hade_jax keeps on disk about a run; the only code that imports orbax.

Layout of a workdir:
  checkpoints/<step>/{state, data, config, meta}   the last `keep` steps (every process writes)
  best/<step>/{state, config, meta}                the best step by the validation metric
  frozen/{state, meta.json}                        frozen parameters, stored once (`frozen`)

  paths       where a checkpoint is (`step_dir`), its saved config (`saved_config`)
  integrity   the checksums saved in `meta` and the check (`verify`); no file access
  frozen      a frozen group's arrays, written once per workdir and filled back on every read
  store       the orbax managers (`Checkpoints`: save, restore for training) and the one
              verified reader (`load` for inference, `read_state`, `restore_state`)

How a model is loaded: `api.load_model` builds the abstract model from the saved config and
calls `load(path, {'params': ..., 'rest': ...})`: only those arrays are read, and each is
checked against its checksum; a damaged checkpoint raises `CorruptCheckpointError` naming the
arrays, in the API, evaluation and search alike.

Resume order (trainer.train_and_evaluate): an existing checkpoint in the workdir, then
`config.init.resume` (a checkpoint directory), then pretrained imports, then scratch.
A damaged newest checkpoint (unreadable, or not matching its checksums) is skipped with a
warning in favour of the newest valid one and renamed `<step>.unreadable` (orbax would
otherwise skip rewriting that step number); the run never silently starts from scratch while
checkpoints exist. Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when
complete, so a process killed mid-write leaves no partial step; leftovers are removed when the
next run opens the workdir.
"""

from hade_jax.checkpoints.integrity import CorruptCheckpointError, state_checksums, verify
from hade_jax.checkpoints.paths import latest_step, read_meta, saved_config, step_dir

# `store` imports orbax: loaded on first use, so that what only reads paths, meta and
# checksums (a portable model folder, `api` before it opens a checkpoint) never imports orbax.
_STORE_NAMES = ("Checkpoints", "Restored", "load", "read_state", "restore_state")


def __getattr__(name: str):
  if name in _STORE_NAMES:
    from hade_jax.checkpoints import store

    return getattr(store, name)
  raise AttributeError(f"module 'hade_jax.checkpoints' has no attribute {name!r}")


__all__ = [
    "Checkpoints", "CorruptCheckpointError", "Restored", "latest_step", "load", "read_meta",
    "read_state", "restore_state", "saved_config", "state_checksums", "step_dir", "verify",
]
