"""A search page over an index: type a sentence, hear the clips.

  python -m hade_jax.serve --index=~/sound_index [--host=127.0.0.1] [--port=8000]
  hade-serve --index=~/sound_index

Serves the index `python -m hade_jax.search index` built, with the model the index names
(loaded once): the page at http://HOST:PORT/, the JSON API (/api/search, /api/similar,
/api/upload; documented at /docs) and the clips' audio (hade_jax/webapp.py). It listens on
127.0.0.1 (this machine only) unless --host says otherwise. An index that fails its integrity
check (`search.Index`; with --verify every file hashed in full) is refused at start-up.

Needs the `serve` extra: pip install 'hade_jax[serve]'.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from absl import flags

from hade_jax import cli

log = logging.getLogger("hade_jax.serve")


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("index", None, "The index folder (python -m hade_jax.search index).",
                      flag_values=fv)
  flags.mark_flag_as_required("index", flag_values=fv)
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every network "
                      "interface; anyone who reaches it can search and listen).",
                      flag_values=fv)
  flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535,
                       flag_values=fv)
  flags.DEFINE_bool("verify", False, "Hash every index file in full before serving (the "
                    "default checks sizes and sampled hashes).", flag_values=fv)
  flags.DEFINE_integer("max_batch", 32, "Text queries embedded in one encoder call.",
                       lower_bound=1, upper_bound=256, flag_values=fv)
  flags.DEFINE_integer("max_pending", 256, "Model calls that may wait; more are answered "
                       "503 (busy).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("max_upload_mb", 20, "Largest uploaded clip, in MiB.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_float("max_upload_seconds", 60.0, "Longest uploaded clip, in seconds.",
                     lower_bound=0.1, flag_values=fv)


def build_app(index_dir: str, *, verify: bool = False, limits=None, warm_up: bool = True):
  """(app, engine) serving the index at `index_dir` with the model it names.

  Raises:
    search.DamagedIndexError: the index fails its integrity check (every problem named).
    FileNotFoundError: no index there (with the command that builds one).
  """
  from hade_jax import search, serving, webapp  # lazily: JAX, fastapi

  if verify:
    problems = search.verify_index(index_dir)
    if problems:
      raise search.DamagedIndexError(f"the index {index_dir} failed verification; not "
                                     "serving it:\n  " + "\n  ".join(problems))
  index = search.Index(index_dir)
  hade = search.load_for_index(index)
  engine = serving.Engine(hade, index, limits or serving.Limits())
  if warm_up:
    engine.warm_up()
  return webapp.create_app(engine), engine


def _check_installed() -> None:
  import importlib.util

  missing = [m for m in ("fastapi", "uvicorn", "python_multipart")
             if importlib.util.find_spec(m) is None]
  if missing:
    raise cli.UsageError(f"hade_jax.serve needs {', '.join(missing)}: pip install "
                         "'hade_jax[serve]'")


def main(argv: Sequence[str] | None = None) -> None:
  """Serves the index the command line names until interrupted."""
  fv, rest = cli.parse(define_flags, argv, doc=__doc__, prog="python -m hade_jax.serve")
  if rest:
    raise cli.UsageError(f"unexpected arguments {rest} (see --help)")
  _check_installed()
  cli.setup_logging()
  import uvicorn

  from hade_jax import serving

  limits = serving.Limits(max_batch=fv.max_batch, max_pending=fv.max_pending,
                          max_upload_bytes=fv.max_upload_mb << 20,
                          max_upload_seconds=fv.max_upload_seconds)
  app, engine = build_app(fv.index, verify=fv.verify, limits=limits)
  if fv.host not in ("127.0.0.1", "localhost", "::1"):
    log.warning("listening on %s: anyone who reaches this address can search the index and "
                "download its audio", fv.host)
  print(f"serving {len(engine.index)} clips of {engine.index.path} at "
        f"http://{fv.host}:{fv.port}/ (Ctrl-C stops)", flush=True)
  try:
    uvicorn.run(app, host=fv.host, port=fv.port, log_level="warning")
  finally:
    engine.close()


def run() -> None:
  """The console script (setup.py); the same as `python -m` of this module."""
  cli.main_entry(main)


if __name__ == "__main__":
  run()
