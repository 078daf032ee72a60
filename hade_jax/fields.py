"""`ConfigError` and the field checks that config dataclasses run in `__post_init__`.

A config dataclass collects every problem of its fields with a `Problems` and raises them as
one `ConfigError`; `validation.validate_config` builds every section and re-labels each problem
with its path in the ConfigDict (`HeadsConfig.num_factors` -> `config.model.heads.num_factors`).
No JAX here: the importers and the validator use it before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence

DTYPES = ("float32", "bfloat16", "float16")
# Refused above this: no accelerator holds more float32 parameters, and a typo such as
# num_hidden_layers=1e6 should fail in a second, not after minutes of allocation.
MAX_PARAM_BYTES = 64 * 2**30
BYTES_PER_PARAM = 4  # parameters stay float32 whatever the compute dtype
# Blocks per tower: each is a Python object traced into the program, so a million of them is a
# typo that would take hours before it ran out of memory. Real towers have 2-100.
MAX_BLOCKS = 1000


class ConfigError(ValueError):
  """A config that cannot run; `problems` lists each as '<section>.<field>: what is wrong'.

  `items` holds the same problems as (field, message) pairs relative to `section` (field ''
  for the section as a whole), so that a caller can re-label them with its own path.
  """

  def __init__(self, problems: Sequence[str] | Sequence[tuple[str, str]],
               section: str = "config"):
    self.section = section
    self.items = [p if isinstance(p, tuple) else _split(p, section) for p in problems]
    self.problems = [f"{section}.{f}: {m}" if f else f"{section}: {m}" for f, m in self.items]
    count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
    super().__init__(f"invalid config ({count}):\n" + "\n".join(f"  {p}" for p in self.problems))


def _split(problem: str, section: str) -> tuple[str, str]:
  """'config.a.b: message' -> ('a.b', 'message') for a problem written out in full."""
  head, _, message = problem.partition(": ")
  prefix = section + "."
  return (head[len(prefix):] if head.startswith(prefix) else head), message


def is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_seq(x) -> bool:
  return isinstance(x, Sequence) and not isinstance(x, str | bytes)


def type_name(x) -> str:
  if isinstance(x, bool):
    return "bool"
  if is_int(x):
    return "int"
  if is_real(x):
    return "float"
  if isinstance(x, str):
    return "str"
  if is_seq(x):
    return "tuple"
  if isinstance(x, Mapping):
    return "ConfigDict"
  return type(x).__name__


def same_type(value, default) -> bool:
  """Whether `value` has the type of `default` (ints are not floats' only alias: 1 is a float)."""
  if default is None:
    return True
  if isinstance(default, bool):
    return isinstance(value, bool)
  if is_int(default):
    return is_int(value)
  if is_real(default):
    return is_real(value)
  if isinstance(default, str):
    return isinstance(value, str)
  if is_seq(default):
    return is_seq(value)
  return True


def default_of(field: dataclasses.Field):
  if field.default is not dataclasses.MISSING:
    return field.default
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return None


def human_bytes(n: float) -> str:
  """1.5 * 2**30 -> '1.5 GiB'."""
  units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
  i = 0
  while n >= 1024 and i < len(units) - 1:
    n, i = n / 1024, i + 1
  return f"{n:.3g} {units[i]}"


class Problems:
  """Collects (field, message) problems of one dataclass; `raise_any` raises them at once."""

  def __init__(self, obj):
    self.obj = obj
    self.items: list[tuple[str, str]] = []

  def add(self, field: str, message: str) -> None:
    self.items.append((field, message))

  def bad(self, field: str) -> bool:
    return any(f == field for f, _ in self.items)

  def types(self, skip: Sequence[str] = ()) -> None:
    """Each field against the type of its default (None defaults accept anything)."""
    for f in dataclasses.fields(self.obj):
      value, default = getattr(self.obj, f.name), default_of(f)
      if f.name in skip:
        continue
      if f.name == "dtype":
        continue  # checked by dtype(): a name or a numpy/jnp dtype
      if value is None and "None" in str(f.type):
        continue  # an optional field (`str | None`)
      if value is None and default is not None:
        self.add(f.name, f"is None; expected {type_name(default)} like {default!r}")
      elif value is not None and not same_type(value, default):
        self.add(f.name, f"expected {type_name(default)} (like the default {default!r}), got "
                 f"{type_name(value)} {value!r}")

  def at_least(self, field: str, low: float) -> bool:
    """value >= low (and finite); False when the value is bad (already reported or now)."""
    value = getattr(self.obj, field)
    if self.bad(field) or not is_real(value):
      return False
    if not math.isfinite(value) or value < low:
      self.add(field, f"must be >= {low}, got {value!r}")
      return False
    return True

  def at_most(self, field: str, high: float, why: str) -> bool:
    value = getattr(self.obj, field)
    if self.bad(field) or not is_real(value):
      return False
    if value > high:
      self.add(field, f"must be <= {high} ({why}), got {value!r}")
      return False
    return True

  def positive(self, field: str) -> bool:
    value = getattr(self.obj, field)
    if self.bad(field) or not is_real(value):
      return False
    if not math.isfinite(value) or value <= 0:
      self.add(field, f"must be > 0, got {value!r}")
      return False
    return True

  def within(self, field: str, low: float, high: float) -> bool:
    """low <= value < high."""
    value = getattr(self.obj, field)
    if self.bad(field) or not is_real(value):
      return False
    if not low <= value < high:
      self.add(field, f"must be in [{low}, {high}), got {value!r}")
      return False
    return True

  def choice(self, field: str, allowed: Sequence) -> bool:
    value = getattr(self.obj, field)
    if self.bad(field):
      return False
    if value not in allowed:
      self.add(field, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
      return False
    return True

  def dtype(self, field: str = "dtype") -> None:
    value = getattr(self.obj, field)
    name = getattr(value, "name", None) or getattr(value, "__name__", None) or value
    if name not in DTYPES:
      self.add(field, f"{value!r} is not one of {', '.join(DTYPES)}")

  def param_bytes(self, num_params: int, fields: Sequence[str]) -> None:
    """Refuses more than MAX_PARAM_BYTES of float32 parameters, naming the size fields."""
    num_bytes = num_params * BYTES_PER_PARAM
    if num_bytes > MAX_PARAM_BYTES:
      sizes = ", ".join(f"{f}={getattr(self.obj, f)!r}" for f in fields)
      self.add("", f"about {human_bytes(num_bytes)} of float32 parameters ({num_params:.3g}) "
               f"exceed the {human_bytes(MAX_PARAM_BYTES)} cap; check the sizes {sizes}")

  def raise_any(self) -> None:
    if self.items:
      raise ConfigError(self.items, section=type(self.obj).__name__)
