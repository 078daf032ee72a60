"""Tables generated into hand-written markdown.

A generated table sits between two markers in a file written by hand:

  <!-- table:training -->
  | system | step time | ... |
  <!-- /table -->

`fill` replaces what is between each pair with the table of that name; everything outside the
markers (the prose, which people write and keep true) is left as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_MARKED = re.compile(r"(<!-- table:(?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /table -->)",
                     re.DOTALL)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A markdown table (ending in a newline) of `rows` under `header`."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def names(text: str) -> list[str]:
  """The names of the tables marked in `text`, in order."""
  return [m["name"] for m in _MARKED.finditer(text)]


def fill(text: str, tables: Mapping[str, str], source: str) -> str:
  """`text` with each marked table replaced by `tables[name]`.

  Raises:
    KeyError: a marker names a table that `tables` lacks (`source`, the file being filled, and
      the missing names are in the message).
  """
  missing = [name for name in names(text) if name not in tables]
  if missing:
    raise KeyError(f"{source} marks tables {missing} that the results do not provide (have: "
                   f"{sorted(tables)}); run the measurement that writes them, or remove the "
                   "markers")
  return _MARKED.sub(lambda m: m[1] + tables[m["name"]] + m[4], text)
