"""The command line of every entry point (train, prepare, eval, search): one system.

  flags     absl, in a `FlagValues` of each command's own (the commands can be imported and run
            together in one process, e.g. by tests); `main(argv)` of each parses its argv
  --config  a locked ml_collections config file, `--config=configs/clotho.py[:arg]`, with
            `--config.KEY=VALUE` overrides (data_pipelines.prepare: a builder config name)
  processes --coordinator_address, --num_processes, --process_id in every command
            (hade_jax/distributed.py)
  logging   Python logging on stderr, set up by `setup_logging` (force=True: a library may have
            configured the root logger on import)
  errors    one message on stderr and a non-zero exit (`run`): 2 for the command line or the
            config (unknown flag, no config file, unknown config key, invalid value, missing
            inputs named in the config), 1 for failures while running; a full disk is named
            once; --verbose (or HADE_VERBOSE=1) also prints the traceback.

This module imports neither JAX nor TensorFlow (data_pipelines.prepare uses it).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

VERBOSE_ENV = "HADE_VERBOSE"
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")


class UsageError(Exception):
  """The command line or the config cannot be used as given (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# Flags shared by the entry points.


def define_config_flag(fv: flags.FlagValues, *, required: bool, help_text: str) -> None:
  """`--config=FILE[:ARG]` (locked: an override of a key the file lacks fails) + overrides."""
  config_flags.DEFINE_config_file("config", None, help_text, flag_values=fv, lock_config=True)
  fv["config"].hade_config_file = True  # `parse` checks the file before absl loads it
  if required:
    flags.mark_flag_as_required("config", flag_values=fv)


def define_distributed_flags(fv: flags.FlagValues) -> None:
  """The multi-process flags (hade_jax/distributed.py), the same in every command."""
  flags.DEFINE_string(
      "coordinator_address", None, "HOST:PORT of process 0's coordinator, the same for every "
      "process (default: $JAX_COORDINATOR_ADDRESS, Slurm, or Cloud TPU detection).",
      flag_values=fv)
  flags.DEFINE_integer(
      "num_processes", None, "Processes in the run, one per host (default: "
      "$JAX_NUM_PROCESSES, $SLURM_NTASKS, or Cloud TPU detection).", lower_bound=1,
      flag_values=fv)
  flags.DEFINE_integer(
      "process_id", None, "This process's index in [0, num_processes) (default: "
      "$JAX_PROCESS_ID, $SLURM_PROCID, or Cloud TPU detection).", lower_bound=0,
      flag_values=fv)


def define_model_flags(fv: flags.FlagValues, *, required: bool) -> None:
  """The model to load (eval, search index): a checkpoint and optionally another config."""
  flags.DEFINE_string("checkpoint", None, "Training workdir (its best step), checkpoints folder "
                      "or step folder.", flag_values=fv)
  flags.DEFINE_alias("workdir", "checkpoint", flag_values=fv)
  flags.DEFINE_enum("which", "best", ["best", "last"], "For a workdir: the best validation "
                    "step or the last step.", flag_values=fv)
  define_config_flag(fv, required=False, help_text="Config file[:arg] (default: the config "
                     "saved with the checkpoint); --config.KEY=VALUE overrides it.")
  flags.DEFINE_multi_string("set", [], "KEY=VALUE override of the config (of --config, else "
                            "the checkpoint's), e.g. --set eval_tile=128 (repeatable).",
                            flag_values=fv)
  if required:
    flags.mark_flag_as_required("checkpoint", flag_values=fv)


def model_config(fv: flags.FlagValues) -> ml_collections.ConfigDict | None:
  """The config of --config / --set, or the checkpoint's own with --set applied (None: the
  checkpoint's own, unchanged)."""
  if fv.config is not None:
    config = fv.config
  elif fv.set:
    from hade_jax import checkpoints  # lazily: JAX

    config = ml_collections.ConfigDict(
        checkpoints.saved_config(checkpoints.step_dir(fv.checkpoint, fv.which)))
  else:
    return None
  apply_overrides(config, fv.set)
  return config


def start_distributed(fv: flags.FlagValues):
  """Joins the multi-process run the flags (or environment) describe; then only process 0
  logs INFO. Returns the `distributed.Plan` carried out."""
  from hade_jax import distributed  # lazily: JAX

  plan = distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
  distributed.quiet_other_processes()
  return plan


def setup_logging(level: int = logging.INFO) -> None:
  logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)  # a library may have configured the root logger on import
  logging.getLogger("absl").setLevel(max(level, logging.WARNING))
  # "Unable to initialize backend 'tpu'" on every machine without one is not news.
  logging.getLogger("jax._src.xla_bridge").setLevel(max(level, logging.WARNING))


# ---------------------------------------------------------------------------------------------
# Config overrides with the closest valid keys.


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  """Every dotted key of a config, inner nodes included ('optim', 'optim.lr', ...)."""
  for key, value in config.items():
    yield prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from config_keys(value, f"{prefix}{key}.")


def unknown_key_message(config: ml_collections.ConfigDict, key: str, flag: str) -> str:
  keys = list(config_keys(config))
  close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
  if not close:  # a typo in the last part: the valid keys beside it
    parent = key.rpartition(".")[0]
    close = [k for k in keys if k.rpartition(".")[0] == parent][:5]
  hint = f"; closest valid keys: {', '.join(close)}" if close else ""
  return f"{flag}: the config has no key {key!r}{hint}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    flag: str = "--set") -> None:
  """`key.sub=value` strings (values as Python literals, else strings) set on `config`."""
  import ast

  for item in overrides:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
      raise UsageError(f"{flag} {item!r}: expected KEY=VALUE")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if key not in set(config_keys(config)):
      raise UsageError(unknown_key_message(config, key, f"{flag} {item}"))
    *path, leaf = key.split(".")
    target = config
    for part in path:
      target = target[part]
    target[leaf] = value


# ---------------------------------------------------------------------------------------------
# Parsing.


def parse(define: Callable[[flags.FlagValues], None], argv: Sequence[str] | None, *,
          doc: str, prog: str) -> tuple[flags.FlagValues, list[str]]:
  """Parses `argv` (without the program name) with the flags `define` adds (+ --verbose).

  Returns:
    The parsed flags and the positional arguments.

  Raises:
    UsageError: an unknown flag, a bad value, a missing config file or an unknown config key.
    SystemExit(0): after printing the help for --help.
  """
  args = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  with _sys_argv([prog, *args]):
    define(fv)
  flags.DEFINE_bool("verbose", False, f"On an error, also print the traceback (or set "
                    f"{VERBOSE_ENV}=1).", flag_values=fv)
  if any(a in HELP_FLAGS for a in args[:args.index("--") if "--" in args else len(args)]):
    print(f"{doc.strip()}\n\nflags of {prog}:\n{fv.get_help(include_special_flags=False)}")
    raise SystemExit(0)
  if not flags.FLAGS.is_parsed():  # libraries that read absl's global flags see defaults
    flags.FLAGS.mark_as_parsed()
  _check_config_files(fv, args)
  try:
    with _sys_argv([prog, *args]):
      rest = fv([prog, *args])[1:]
  except flags.Error as e:
    required = re.match(r"flag --(\w+)=None: Flag --\1 must have a value other than None", str(e))
    if required:
      raise UsageError(f"--{required[1]} is required (see {prog} --help)") from None
    raise UsageError(_override_problem(fv, args) or str(e)) from None
  except (AttributeError, KeyError) as e:  # config_flags: an override of a key the file lacks
    raise UsageError(_override_problem(fv, args) or f"{type(e).__name__}: {e}") from None
  return fv, rest


@contextlib.contextmanager
def _sys_argv(argv: list[str]) -> Iterator[None]:
  """sys.argv = argv for a while: config_flags defines the `--config.KEY` override flags (and
  reads their values) from sys.argv, not from the argv it parses; a command run in-process
  with other arguments (tests, hade_jax.ablate) would otherwise lose its overrides."""
  saved = sys.argv
  sys.argv = argv
  try:
    yield
  finally:
    sys.argv = saved


def _flag_values_in(args: Sequence[str], name: str) -> Iterator[str]:
  """Values of --name=V / --name V in an argv."""
  for i, arg in enumerate(args):
    if arg.startswith(f"--{name}="):
      yield arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(args):
      yield args[i + 1]


def _check_config_files(fv: flags.FlagValues, args: Sequence[str]) -> None:
  for name in list(fv):
    if getattr(fv[name], "hade_config_file", False):
      for spec in _flag_values_in(args, name):
        path = spec.partition(":")[0]
        if not os.path.isfile(os.path.expanduser(path)):
          raise UsageError(f"no config file {path} (--{name}={spec}; from {os.getcwd()})")


def _override_problem(fv: flags.FlagValues, args: Sequence[str]) -> str | None:
  """The first `--config.KEY=...` whose KEY the config lacks, with the closest valid keys."""
  for name in list(fv):
    if not getattr(fv[name], "hade_config_file", False):
      continue
    spec = next(iter(_flag_values_in(args, name)), None)
    if spec is None:
      continue
    try:
      config = _load_config(spec)
    except Exception:  # noqa: BLE001 - the parse error itself is reported instead
      return None
    keys = set(config_keys(config))
    for arg in args:
      if arg.startswith(f"--{name}."):
        key = arg[len(name) + 3:].partition("=")[0]
        if key not in keys:
          return unknown_key_message(config, key, arg)
        node = config
        for part in key.split("."):
          node = node[part]
        if isinstance(node, ml_collections.ConfigDict):
          return (f"{arg}: {key} holds the keys {', '.join(node)}: set them one by one, e.g. "
                  f"--{name}.{key}.{next(iter(node))}=...")
  return None


def _load_config(spec: str) -> ml_collections.ConfigDict:
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_hade_cli_config",
                                                       os.path.expanduser(path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


# ---------------------------------------------------------------------------------------------
# Running a command: one clear error, an exit status.


def is_verbose(argv: Sequence[str]) -> bool:
  return (os.environ.get(VERBOSE_ENV, "") not in ("", "0")
          or any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv))


def _chain(e: BaseException) -> Iterator[BaseException]:
  """The exception, its causes and contexts, and the members of exception groups."""
  seen, todo = set(), [e]
  while todo:
    x = todo.pop(0)
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    yield x
    todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]


def _is_config_error(e: BaseException) -> bool:
  """Usage or config errors (without importing the JAX-using modules that define some)."""
  kinds = [UsageError, flags.Error]
  for module, name in (("hade_jax.validation", "ConfigError"), ("absl.app", "UsageError")):
    kind = getattr(sys.modules.get(module), name, None)
    if kind is not None:
      kinds.append(kind)
  return isinstance(e, tuple(kinds))


def describe(e: BaseException) -> tuple[int, str]:
  """(exit status, one message) for an exception that ended a command."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno == errno.ENOSPC:
      where = f" writing {x.filename}" if x.filename else ""
      return 1, (f"no space left on device{where} (errno ENOSPC). Free some space (or write "
                 "elsewhere) and run the same command again: it continues from what was "
                 "finished.")
  message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  if _is_config_error(e):
    return 2, message
  if not isinstance(e, (ValueError, OSError, LookupError)) or not message:
    message = f"{type(e).__name__}: {message}" if message else type(e).__name__
  return 1, message


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
  """Runs `main(argv)` as a command; returns its exit status after printing any error once."""
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = is_verbose(argv)
  try:
    main(argv)
  except SystemExit as e:  # --help, or a main that exits on its own
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except KeyboardInterrupt:
    if verbose:
      traceback.print_exc()
    print("error: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 - every error ends in one message
    status, message = describe(e)
    if verbose:
      traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    if status == 1 and not verbose:
      print(f"(the traceback: add --verbose or set {VERBOSE_ENV}=1)", file=sys.stderr)
    return status
  return 0


def main_entry(main: Callable[[list[str]], object]) -> None:
  """`if __name__ == "__main__"` of an entry point: `run`, then exit with its status.

  After an error (without --verbose) nothing more reaches the terminal: background threads of
  the libraries (asynchronous checkpointing, data loaders) shutting down would otherwise print
  pages of follow-on errors under the one that matters.
  """
  status = run(main)
  if status and not is_verbose(sys.argv[1:]):
    sys.stdout.flush()
    sys.stderr.flush()
    logging.disable(logging.CRITICAL)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
  sys.exit(status)
