"""Paths named by a file (a captions CSV, a safetensors index, a search manifest) stay inside
the folder that file describes.

A name read from a file is data, not a permission: `../../etc/passwd` or `/etc/passwd` in a
CSV must not make evaluation read outside `--audio_dir`. Names are checked twice: lexically
(absolute, or `..` leaving the folder) and after following symlinks (a link inside the folder
that points elsewhere), the second refused unless the caller allows it.
"""

from __future__ import annotations

import os
import pathlib


class PathOutsideError(ValueError):
  """A path named by a file leaves the folder it must stay in."""


def resolve_inside(root: str | os.PathLike, name: str | os.PathLike, *, what: str,
                   allow_symlinks_outside: bool = False) -> pathlib.Path:
  """`root / name`, refused when it leaves `root`.

  Args:
    root: the folder.
    name: the relative name read from a file.
    what: where the name came from, for the message (e.g. 'captions.csv line 7').
    allow_symlinks_outside: accept a name inside `root` whose symlinks lead outside it.

  Raises:
    PathOutsideError: `name` is absolute, climbs out of `root` with `..`, or (unless allowed)
      resolves through a symlink to a file outside `root`.
  """
  root = pathlib.Path(root).expanduser().absolute()
  text = os.fspath(name)
  if os.path.isabs(text) or pathlib.PurePath(text).drive:
    raise PathOutsideError(f"{what}: {text!r} is an absolute path; names must be relative to "
                           f"{root}")
  path = root / text
  if not _is_within(os.path.normpath(path), os.path.normpath(root)):
    raise PathOutsideError(f"{what}: {text!r} leaves {root} (through '..'); names must stay "
                           "inside the folder")
  if not allow_symlinks_outside and os.path.lexists(path):
    real_root = os.path.realpath(root)
    if not _is_within(os.path.realpath(path), real_root):
      raise PathOutsideError(
          f"{what}: {text!r} is a symlink (or lies under one) that leads outside {root} to "
          f"{os.path.realpath(path)}; allow it explicitly (allow_symlinks_outside=True / "
          "--allow_symlinks_outside) if that is intended")
  return path


def _is_within(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
