"""The page: its sections (what each shows, or why it cannot) and their rendering through
`template.html` (jinja2, autoescaped: captions and file names are text, never markup)."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import pathlib
from collections.abc import Sequence

TEMPLATE = "template.html"


@dataclasses.dataclass
class Section:
  id: str
  title: str
  missing: str = ""  # why the section has no content ('' when it has)
  images: list[dict] = dataclasses.field(default_factory=list)  # {name, src, alt, png}
  table: list[dict] | None = None
  examples: list = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def add_image(self, name: str, png: bytes, alt: str) -> None:
    self.images.append({"name": name, "src": data_uri(png), "alt": alt, "png": png})


def data_uri(png: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclasses.dataclass
class Report:
  html: str
  sections: list[Section]
  step_dir: str  # the checkpoint the model sections came from ('' when none)

  @property
  def missing(self) -> list[str]:
    return missing_lines(self.sections)


def missing_lines(sections: Sequence[Section]) -> list[str]:
  return [f"{s.title}: {s.missing}" for s in sections if s.missing]


def render(workdir: pathlib.Path, sections: Sequence[Section], step_dir: str) -> str:
  import jinja2

  env = jinja2.Environment(loader=jinja2.PackageLoader("hade_jax.report", "."),
                           autoescape=True, undefined=jinja2.StrictUndefined)
  written = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
  return env.get_template(TEMPLATE).render(
      workdir=str(workdir), step_dir=step_dir, written=written, sections=sections,
      missing=missing_lines(sections))


def write(report: Report, out: pathlib.Path, images_dir: pathlib.Path | None = None) -> None:
  """Writes the page to `out` (and each figure as `<images_dir>/<name>.png`)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(report.html, encoding="utf-8")
  if images_dir is not None:
    images_dir.mkdir(parents=True, exist_ok=True)
    for section in report.sections:
      for image in section.images:
        (images_dir / f"{image['name']}.png").write_bytes(image["png"])
