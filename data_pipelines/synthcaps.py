"""synthcaps: a seeded generator of captioned sound scenes, written in the Clotho layout.

The demo and the tests train on it, so it must make retrieval depend on detail: every scene
belongs to a *family* whose members share their events but differ in the order, the count or
one attribute (pitch, loudness, tempo) of an event, and the members land in the same split.
A model that only recognises "dog + bell" cannot tell them apart; the captions say which is
which ("a dog barks twice, then a bell rings" vs "a bell rings, then a dog barks twice").

Output (the Clotho v2.1 layout, so `readers` and `builders` prepare it like Clotho):
  clotho_captions_{development,validation,evaluation}.csv   file_name,caption_1..caption_5
  {development,validation,evaluation}/synthcaps_{split}_{index:06d}.wav   mono PCM16
  synthcaps_ground_truth_{split}.jsonl   one JSON object per clip: events, order, attributes
  synthcaps_params.json                  the generator parameters (a rerun must match them)

Every clip is a pure function of (seed, split, family index), so the output is identical
whatever the number of worker processes, and a rerun only writes the files still missing.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import multiprocessing
import os
import pathlib

import numpy as np
import soundfile

from data_pipelines import audio_io

VERSION = "1.0.0"  # Bump when the generated audio or captions change for the same seed.

# TFDS split -> Clotho split folder name; the split id seeds the split's random stream.
SPLITS = {"train": "development", "validation": "validation", "test": "evaluation"}
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}

# Inter-onset intervals of repeated events (seconds).
_IOI = {"slow": 0.7, "fast": 0.25}
# Peak level of an event: 'loud' is 14 dB above 'quiet'.
_LEVEL = {"loud": 0.5, "quiet": 0.1}
_BACKGROUND_GAIN = 0.6
_NOISE_FLOOR = 0.002
_MIN_CLIP_SECONDS = 4.0


@dataclasses.dataclass(frozen=True)
class EventType:
  """One kind of sound: how it is synthesised and how captions name it."""

  name: str
  repeated: bool  # a countable sequence of units (barks) vs a continuous sound (rain)
  pitched: bool
  sources: tuple[str, ...]  # what makes the sound, singular: 'dog'
  verbs: tuple[str, ...]  # third person: 'barks'
  units: tuple[str, ...] = ()  # repeated: one sound unit, singular: 'bark'
  sounds: tuple[str, ...] = ()  # continuous: the sound as a noun: 'hum'
  gerunds: tuple[str, ...] = ()  # 'barking' for "a dog barking in the background"
  mass: bool = False  # 'rain', not 'a rain'
  loud_words: tuple[str, ...] = ("loud", "strong", "powerful")
  quiet_words: tuple[str, ...] = ("quiet", "soft", "faint")


EVENT_TYPES = {
    t.name: t for t in [
        EventType("dog", True, True, ("dog", "hound"), ("barks", "yaps"), ("bark", "yap"),
                  gerunds=("barking", "yapping")),
        EventType("bird", True, True, ("bird", "songbird"), ("chirps", "tweets"),
                  ("chirp", "tweet"), gerunds=("chirping", "tweeting")),
        EventType("footsteps", True, False, ("person", "walker"), ("steps", "treads"),
                  ("footstep", "step"), gerunds=("walking", "stepping")),
        EventType("beep", True, True, ("machine", "device"), ("beeps", "bleeps"),
                  ("beep", "bleep"), gerunds=("beeping",)),
        EventType("bell", True, True, ("bell", "church bell"), ("rings", "tolls"),
                  ("ring", "chime"), gerunds=("ringing", "tolling")),
        EventType("clapping", True, False, ("person", "audience member"), ("claps",),
                  ("clap", "handclap"), gerunds=("clapping",)),
        EventType("knocking", True, True, ("door", "wooden door"),
                  ("is knocked on", "gets knocked on"), ("knock", "rap"),
                  gerunds=("being knocked on",)),
        EventType("dripping", True, True, ("tap", "faucet"), ("drips", "leaks drops"),
                  ("drip", "drop"), gerunds=("dripping",)),
        EventType("siren", False, True, ("siren", "police siren"), ("wails", "blares"),
                  sounds=("wail", "howl"), gerunds=("wailing", "blaring")),
        EventType("engine", False, True, ("engine", "motor"), ("hums", "drones", "rumbles"),
                  sounds=("hum", "drone", "rumble"), gerunds=("humming", "running")),
        EventType("rain", False, False, ("rain",), ("falls", "pours down", "patters"),
                  sounds=("patter", "sound"), gerunds=("falling", "pattering"), mass=True,
                  loud_words=("heavy", "loud", "pouring"),
                  quiet_words=("light", "gentle", "soft")),
        EventType("wind", False, False, ("wind",), ("blows", "gusts", "howls"),
                  sounds=("rush", "sound", "gusting"), gerunds=("blowing", "gusting"),
                  mass=True, loud_words=("strong", "loud", "heavy"),
                  quiet_words=("gentle", "light", "soft")),
    ]
}
REPEATED = tuple(n for n, t in EVENT_TYPES.items() if t.repeated)
CONTINUOUS = tuple(n for n, t in EVENT_TYPES.items() if not t.repeated)


@dataclasses.dataclass
class Event:
  """One sound event of a scene (the ground truth captions are generated from).

  Attributes:
    type: an `EVENT_TYPES` key.
    loudness: 'quiet' or 'loud'.
    pitch: 'low' / 'high', None for unpitched types.
    count: number of units for repeated types, None for continuous ones.
    tempo: 'slow' / 'fast' for repeated types with count >= 2 and for sirens, else None.
    background: spans the whole clip behind the foreground events.
    onset: start in seconds.
    duration: length in seconds.
    slot: identity inside the family, so variants render the shared parts identically.
  """

  type: str
  loudness: str
  pitch: str | None = None
  count: int | None = None
  tempo: str | None = None
  background: bool = False
  onset: float = 0.0
  duration: float = 0.0
  slot: int = 0


@dataclasses.dataclass
class Scene:
  """A clip's ground truth.

  Attributes:
    structure: 'single', 'sequence' (foreground events one after another, in list order),
      'overlap' (two foreground events at the same time) or 'background' (foreground events
      in sequence over a continuous background event, listed last).
    events: the events.
    family: index of the family inside the split.
    variant: 'base', or what differs from the family's base scene: 'order', 'count',
      'pitch', 'loudness', 'tempo'.
    changed: the slot of the event that was changed (None for 'base' and 'order').
    gaps: sequence layout, fractions of the free time before/between events.
  """

  structure: str
  events: list[Event]
  family: int
  variant: str = "base"
  changed: int | None = None
  gaps: tuple[float, ...] = ()

  @property
  def foreground(self) -> list[Event]:
    return [e for e in self.events if not e.background]

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out.pop("gaps")
    for e in out["events"]:
      e["onset"] = round(e["onset"], 3)
      e["duration"] = round(e["duration"], 3)
    return out


# ------------------------------------------------------------------------------ synthesis
def _env(n: int, sr: int, attack: float, decay: float) -> np.ndarray:
  """Linear attack then exponential decay (time constant `decay`)."""
  t = np.arange(n) / sr
  attack_part = np.clip(t / max(attack, 1e-4), 0.0, 1.0)
  return attack_part * np.exp(-np.maximum(t - attack, 0.0) / decay)


def _osc(freq_hz: np.ndarray | float, n: int, sr: int, phase: float = 0.0) -> np.ndarray:
  freq = np.broadcast_to(np.asarray(freq_hz, dtype=np.float64), (n,))
  return np.sin(phase + 2 * np.pi * np.cumsum(freq) / sr)


def _band_noise(rng, n: int, sr: int, lo: float, hi: float, tilt: float = 0.0) -> np.ndarray:
  """White noise shaped in the frequency domain to [lo, hi] Hz with a 1/f**tilt slope."""
  spec = np.fft.rfft(rng.standard_normal(n))
  f = np.fft.rfftfreq(n, 1 / sr)
  gain = ((f >= lo) & (f <= hi)).astype(np.float64)
  if tilt:
    gain = gain / np.maximum(f, lo) ** tilt
  x = np.fft.irfft(spec * gain, n)
  return x / (np.max(np.abs(x)) + 1e-9)


def _pitch_value(u: float, pitch: str | None, low: tuple[float, float],
                 high: tuple[float, float]) -> float:
  lo, hi = high if pitch == "high" else low
  return lo + u * (hi - lo)


def _unit(kind: str, rng, sr: int, pitch: str | None, u: float) -> np.ndarray:
  """One unit of a repeated event; `u` in [0, 1) places the pitch inside its class."""
  if kind == "dog":  # harmonic burst with a rise-fall f0 contour and breath noise
    n = int(0.2 * sr)
    f0 = _pitch_value(u, pitch, (250, 340), (560, 720))
    t = np.arange(n) / n
    contour = f0 * (1 + 0.25 * np.sin(np.pi * t))
    x = sum(_osc(k * contour, n, sr) / k for k in range(1, 9) if k * f0 * 1.3 < sr / 2)
    x = x + 0.3 * _band_noise(rng, n, sr, 300, 3000)
    return x * _env(n, sr, 0.01, 0.06)
  if kind == "bird":  # fast upward FM sweep
    n = int(0.09 * sr)
    lo = _pitch_value(u, pitch, (1700, 2100), (3400, 4000))
    f = np.linspace(lo, lo * 1.6, n)
    return _osc(f, n, sr) * np.hanning(n)
  if kind == "footsteps":  # low thud: decaying 80 Hz sine plus low-passed noise
    n = int(0.15 * sr)
    x = _osc(70 + 20 * u, n, sr) + 0.6 * _band_noise(rng, n, sr, 40, 500)
    return x * _env(n, sr, 0.004, 0.035)
  if kind == "beep":  # pure tone, flat envelope with 5 ms ramps
    n = int(0.14 * sr)
    f = _pitch_value(u, pitch, (600, 800), (1800, 2200))
    ramp = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.005 * sr))
    return _osc(f, n, sr) * ramp
  if kind == "bell":  # inharmonic partials (hum, prime, tierce, quint, nominal), long decay
    n = int(1.2 * sr)
    f = _pitch_value(u, pitch, (260, 340), (780, 960))
    x = np.zeros(n)
    for ratio, amp, decay in [(0.5, 0.5, 0.9), (1.0, 1.0, 0.6), (1.2, 0.6, 0.45),
                              (1.5, 0.4, 0.35), (2.0, 0.5, 0.3), (2.7, 0.2, 0.2)]:
      if ratio * f < sr / 2:
        x += amp * _osc(ratio * f, n, sr) * _env(n, sr, 0.002, decay)
    return x
  if kind == "clapping":  # broadband 1 ms attack noise burst, ~25 ms decay
    n = int(0.06 * sr)
    return _band_noise(rng, n, sr, 800, min(6000, sr / 2 - 1)) * _env(n, sr, 0.001, 0.012)
  if kind == "knocking":  # damped resonance plus a click
    n = int(0.08 * sr)
    f = _pitch_value(u, pitch, (170, 230), (420, 540))
    x = _osc(f, n, sr) * _env(n, sr, 0.001, 0.02)
    click = _band_noise(rng, n, sr, 1000, min(5000, sr / 2 - 1)) * _env(n, sr, 0.0005, 0.002)
    return x + 0.5 * click
  if kind == "dripping":  # 'plop': a sine whose pitch rises quickly, short decay
    n = int(0.06 * sr)
    lo = _pitch_value(u, pitch, (550, 700), (1300, 1600))
    f = lo * (1 + 1.2 * (1 - np.exp(-np.arange(n) / (0.01 * sr))))
    return _osc(f, n, sr) * _env(n, sr, 0.001, 0.015)
  raise ValueError(f"not a repeated event type: {kind!r}")


def _continuous(kind: str, rng, sr: int, n: int, pitch: str | None, tempo: str | None,
                u: float) -> np.ndarray:
  t = np.arange(n) / sr
  if kind == "siren":  # sinusoidal wail around a centre frequency
    fc = _pitch_value(u, pitch, (520, 640), (1100, 1300))
    period = 2.0 if tempo == "slow" else 0.5
    f = fc * (1 + 0.3 * np.sin(2 * np.pi * t / period))
    return _osc(f, n, sr) + 0.3 * _osc(2 * f, n, sr)
  if kind == "engine":  # low harmonic hum, amplitude-modulated at the firing rate
    f0 = _pitch_value(u, pitch, (38, 50), (85, 110))
    x = sum(_osc(k * f0, n, sr) / k for k in range(1, 13) if k * f0 < sr / 2)
    x = x * (1 + 0.3 * np.sin(2 * np.pi * f0 / 2 * t))
    return x + 0.4 * _band_noise(rng, n, sr, 20, 400) * np.max(np.abs(x))
  if kind == "rain":  # high-passed noise plus Poisson droplet clicks
    x = 0.5 * _band_noise(rng, n, sr, 1000, sr / 2)
    hits = rng.random(n) < 60.0 / sr
    drop = _osc(4000 * min(1.0, sr / 8000 / 1.2), int(0.004 * sr), sr)
    drop = drop * np.hanning(len(drop))
    return x + np.convolve(hits * rng.uniform(0.2, 1.0, n), drop, mode="same")
  if kind == "wind":  # low-passed pink-ish noise with slow random gusts
    x = _band_noise(rng, n, sr, 60, 1200, tilt=0.5)
    knots = rng.uniform(0.2, 1.0, int(n / sr / 0.7) + 3)
    gust = np.interp(t, np.linspace(0, t[-1] + 1e-9, len(knots)), knots)
    return x * gust
  raise ValueError(f"not a continuous event type: {kind!r}")


def _fade(x: np.ndarray, sr: int, seconds: float = 0.08) -> np.ndarray:
  k = min(len(x) // 2, int(seconds * sr))
  if k > 0:
    ramp = np.linspace(0.0, 1.0, k)
    x[:k] *= ramp
    x[-k:] *= ramp[::-1]
  return x


def event_duration(e: Event, clip_seconds: float) -> float:
  """Seconds an event lasts (the unit lengths mirror `_unit`)."""
  if e.background:
    return clip_seconds
  if EVENT_TYPES[e.type].repeated:
    unit = {"dog": 0.2, "bird": 0.09, "footsteps": 0.15, "beep": 0.14, "bell": 1.2,
            "clapping": 0.06, "knocking": 0.08, "dripping": 0.06}[e.type]
    ioi = _IOI[e.tempo] if e.tempo else 0.0
    return (e.count - 1) * ioi + unit
  return e.duration or 2.5


def render(scene: Scene, *, sr: int, clip_seconds: float, seed: int) -> np.ndarray:
  """The scene as a float32 waveform; `seed` fixes the noise and per-event pitch jitter."""
  n = int(round(clip_seconds * sr))
  mix = np.zeros(n)
  for e in scene.events:
    # Seeded by the event's slot, so family members render shared events identically.
    rng = np.random.default_rng([seed, e.slot])
    u = float(rng.random())
    level = _LEVEL[e.loudness] * (_BACKGROUND_GAIN if e.background else 1.0)
    start = int(round(e.onset * sr))
    if EVENT_TYPES[e.type].repeated:
      ioi = _IOI[e.tempo] if e.tempo else 0.0
      jitter = rng.uniform(-0.02, 0.02, e.count)
      for k in range(e.count):
        unit = _unit(e.type, rng, sr, e.pitch, u)
        unit = unit / (np.max(np.abs(unit)) + 1e-9) * level
        s = start + int(round((k * ioi + (jitter[k] if k else 0.0)) * sr))
        s = max(0, s)
        m = min(len(unit), n - s)
        if m > 0:
          mix[s:s + m] += unit[:m]
    else:
      m = min(int(round(e.duration * sr)), n - start)
      if m <= 0:
        continue
      x = _continuous(e.type, rng, sr, m, e.pitch, e.tempo, u)
      x = _fade(x / (np.max(np.abs(x)) + 1e-9), sr) * level
      mix[start:start + m] += x
  mix += _NOISE_FLOOR * np.random.default_rng([seed, 999]).standard_normal(n)
  peak = np.max(np.abs(mix))
  if peak > 0.95:
    mix *= 0.95 / peak
  return mix.astype(np.float32)


# ------------------------------------------------------------------------------ scenes
def _random_event(rng, kind: str, slot: int, background: bool = False) -> Event:
  t = EVENT_TYPES[kind]
  e = Event(type=kind, loudness=str(rng.choice(["quiet", "loud"])), slot=slot,
            background=background)
  if t.pitched:
    e.pitch = str(rng.choice(["low", "high"]))
  if t.repeated:
    e.count = int(rng.integers(1, 5))
    e.tempo = str(rng.choice(["slow", "fast"])) if e.count > 1 else None
  else:
    e.duration = float(rng.uniform(1.5, 3.0))
    if kind == "siren":
      e.tempo = str(rng.choice(["slow", "fast"]))
  if background:
    # A background that shouts over the foreground is not a background.
    e.loudness = "quiet" if rng.random() < 0.7 else "loud"
  return e


def layout(scene: Scene, clip_seconds: float) -> bool:
  """Sets onsets and durations; False if the scene does not fit in the clip."""
  margin = 0.2
  for e in scene.events:
    e.duration = event_duration(e, clip_seconds) if (e.background or
                                                      EVENT_TYPES[e.type].repeated) else e.duration
  fg = scene.foreground
  if scene.structure == "overlap":
    a, b = fg
    # b starts inside a, so the two are heard together.
    b_onset = margin + scene.gaps[0] * a.duration * 0.5
    end = max(margin + a.duration, b_onset + b.duration)
    if end > clip_seconds - margin:
      return False
    a.onset, b.onset = margin, b_onset
    return True
  busy = sum(e.duration for e in fg)
  free = clip_seconds - 2 * margin - busy - 0.3 * (len(fg) - 1)
  if free < 0:
    return False
  t = margin
  for i, e in enumerate(fg):
    t += free * scene.gaps[i] + (0.3 if i else 0.0)
    e.onset = t
    t += e.duration
  for e in scene.events:
    if e.background:
      e.onset = 0.0
  return True


def base_scene(rng, family: int, clip_seconds: float) -> Scene:
  """A random scene: one to three events in one of the four structures."""
  for _ in range(100):
    structure = str(rng.choice(["single", "sequence", "sequence", "overlap", "background"]))
    if structure == "single":
      kinds = [str(rng.choice(list(EVENT_TYPES)))]
    elif structure == "sequence":
      n = 3 if rng.random() < 0.25 else 2
      kinds = [str(k) for k in rng.choice(list(EVENT_TYPES), size=n, replace=False)]
    elif structure == "overlap":
      kinds = [str(rng.choice(REPEATED)), str(rng.choice(CONTINUOUS))]
      rng.shuffle(kinds)
    else:
      kinds = [str(k) for k in rng.choice(REPEATED, size=int(rng.integers(1, 3)),
                                          replace=False)]
    events = [_random_event(rng, k, slot) for slot, k in enumerate(kinds)]
    if structure == "background":
      bg = str(rng.choice([k for k in CONTINUOUS if k not in kinds]))
      events.append(_random_event(rng, bg, len(events), background=True))
    gaps = tuple(float(g) for g in rng.dirichlet(np.ones(len(kinds) + 1)))
    if structure == "overlap":
      gaps = (float(rng.uniform(0.2, 0.8)),)
    scene = Scene(structure, events, family, gaps=gaps)
    if layout(scene, clip_seconds):
      return scene
  raise ValueError(f"cannot fit a scene in {clip_seconds} s clips")


def variants(scene: Scene) -> list[tuple[str, int | None]]:
  """The single changes that make a contrasting sibling of `scene`."""
  out = []
  fg = scene.foreground
  if scene.structure in ("sequence", "background") and len(fg) >= 2:
    out.append(("order", None))
  for e in scene.events:
    t = EVENT_TYPES[e.type]
    if t.repeated:
      out.append(("count", e.slot))
    if t.pitched:
      out.append(("pitch", e.slot))
    out.append(("loudness", e.slot))
    if e.tempo is not None:
      out.append(("tempo", e.slot))
  return out


def make_variant(scene: Scene, change: str, slot: int | None, rng,
                 clip_seconds: float) -> Scene | None:
  """`scene` with one change, or None if the changed scene does not fit."""
  new = dataclasses.replace(scene, events=[dataclasses.replace(e) for e in scene.events],
                            variant=change, changed=slot)
  if change == "order":
    fg = new.foreground
    # Reverse the foreground (for three events, a rotation would keep two pairs in order).
    new.events = fg[::-1] + [e for e in new.events if e.background]
  else:
    e = next(e for e in new.events if e.slot == slot)
    if change == "count":
      e.count = int(rng.choice([c for c in range(1, 5) if c != e.count]))
      e.tempo = (e.tempo or str(rng.choice(["slow", "fast"]))) if e.count > 1 else None
    elif change == "pitch":
      e.pitch = "high" if e.pitch == "low" else "low"
    elif change == "loudness":
      e.loudness = "quiet" if e.loudness == "loud" else "loud"
    elif change == "tempo":
      e.tempo = "slow" if e.tempo == "fast" else "fast"
  return new if layout(new, clip_seconds) else None


def family_scenes(seed: int, split: str, family: int, size: int,
                  clip_seconds: float) -> list[Scene]:
  """A family: a base scene and `size - 1` siblings, each differing in one respect."""
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], family])
  scene = base_scene(rng, family, clip_seconds)
  out = [scene]
  options = variants(scene)
  rng.shuffle(options)
  # An order change first when there is one: it is what a bag-of-events model cannot see.
  options.sort(key=lambda o: o[0] != "order")
  for change, slot in options:
    if len(out) == size:
      break
    new = make_variant(scene, change, slot, rng, clip_seconds)
    if new is not None:
      out.append(new)
  return out


# ------------------------------------------------------------------------------ captions
_COUNT_ADV = {1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times"}
_COUNT_NUM = {1: "a single", 2: "two", 3: "three", 4: "four", 5: "five"}
_PITCH_ADJ = {"high": ("high-pitched", "shrill", "high"), "low": ("low-pitched", "deep", "low")}
_PITCH_PP = {"high": ("in a high pitch", "at a high pitch", "in a high tone"),
             "low": ("in a low pitch", "at a low pitch", "in a deep tone")}
_LOUD_ADV = {"loud": ("loudly",), "quiet": ("quietly", "softly", "faintly")}
_TEMPO_ADV = {"fast": ("quickly", "rapidly", "in quick succession"),
              "slow": ("slowly", "with long pauses", "at a slow pace")}
_TEMPO_ADJ = {"fast": ("quick", "rapid", "fast"), "slow": ("slow", "unhurried", "spaced-out")}
_SIREN_TEMPO = {"fast": ("rapidly", "in fast cycles"), "slow": ("slowly", "in long sweeps")}


def _pick(rng, options):
  return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(word: str) -> str:
  if word.endswith(("ch", "sh")):
    return word + "es"
  return word + "s"


def _adjectives(rng, e: Event) -> list[str]:
  t = EVENT_TYPES[e.type]
  words = [_pick(rng, t.loud_words if e.loudness == "loud" else t.quiet_words)]
  if e.pitch:
    words.append(_pick(rng, _PITCH_ADJ[e.pitch]))
  return words


def clause(rng, e: Event) -> str:
  """A clause stating everything about `e`: 'a loud dog barks three times quickly'."""
  t = EVENT_TYPES[e.type]
  source = _pick(rng, t.sources)
  verb = _pick(rng, t.verbs)
  if t.repeated:
    if rng.random() < 0.5:
      subject = " ".join(_adjectives(rng, e) + [source])
      mods = []
    else:
      subject = source
      mods = [_pick(rng, _LOUD_ADV[e.loudness])]
      if e.pitch:
        mods.append(_pick(rng, _PITCH_PP[e.pitch]))
    if e.tempo:
      mods.append(_pick(rng, _TEMPO_ADV[e.tempo]))
    rng.shuffle(mods)
    subject = subject if t.mass else _article(subject)
    tail = f" {_COUNT_ADV[e.count]}"
    if mods:
      tail += " " + (" and ".join(mods) if len(mods) == 2 else ", ".join(mods))
    return f"{subject} {verb}{tail}"
  subject = " ".join(_adjectives(rng, e) + [source])
  subject = subject if t.mass else _article(subject)
  tail = f" {_pick(rng, _SIREN_TEMPO[e.tempo])}" if e.tempo else ""
  return f"{subject} {verb}{tail}"


def noun_phrase(rng, e: Event) -> str:
  """A noun phrase stating everything about `e`: 'three quick, loud barks from a dog'."""
  t = EVENT_TYPES[e.type]
  source = _pick(rng, t.sources)
  adjectives = _adjectives(rng, e)
  if t.repeated:
    unit = _pick(rng, t.units)
    words = ([_pick(rng, _TEMPO_ADJ[e.tempo])] if e.tempo else []) + adjectives
    head = ", ".join(words[:-1]) + (" " if len(words) > 1 else "") + words[-1]
    unit = unit if e.count == 1 else _plural(unit)
    of = source if t.mass else _article(source)
    return f"{_COUNT_NUM[e.count]} {head} {unit} from {of}"
  sound = _pick(rng, t.sounds)
  tempo = f" cycling {_pick(rng, ('fast', 'quickly'))}" if e.tempo == "fast" else (
      f" cycling {_pick(rng, ('slowly', 'in long sweeps'))}" if e.tempo == "slow" else "")
  if t.mass and rng.random() < 0.5:
    return " ".join(adjectives + [source]) + tempo
  of = source if t.mass else _article(source)
  return f"the {' '.join(adjectives)} {sound} of {of}{tempo}"


def gerund_phrase(rng, e: Event) -> str:
  """'heavy rain falling', used with 'in the background'."""
  t = EVENT_TYPES[e.type]
  subject = " ".join(_adjectives(rng, e) + [_pick(rng, t.sources)])
  subject = subject if t.mass else _article(subject)
  tempo = f" {_pick(rng, _SIREN_TEMPO[e.tempo])}" if e.tempo else ""
  return f"{subject} {_pick(rng, t.gerunds)}{tempo}"


def _sequence(rng, events: list[Event]) -> str:
  if len(events) == 1:
    return clause(rng, events[0])
  form = int(rng.integers(5))
  if len(events) == 2:
    a, b = events
    if form == 0:
      return f"{clause(rng, a)}, then {clause(rng, b)}"
    if form == 1:
      return f"{clause(rng, a)}, followed by {noun_phrase(rng, b)}"
    if form == 2:
      return f"first {clause(rng, a)}, and then {clause(rng, b)}"
    if form == 3:
      return f"after {noun_phrase(rng, a)}, {clause(rng, b)}"
    return f"{clause(rng, a)} before {clause(rng, b)}"
  a, b, c = events
  if form in (0, 1):
    return f"{clause(rng, a)}, then {clause(rng, b)}, and then {clause(rng, c)}"
  if form == 2:
    return f"first {clause(rng, a)}, then {clause(rng, b)}, and finally {clause(rng, c)}"
  if form == 3:
    return f"{noun_phrase(rng, a)}, then {noun_phrase(rng, b)}, then {noun_phrase(rng, c)}"
  return f"{clause(rng, a)}, followed by {noun_phrase(rng, b)} and then {noun_phrase(rng, c)}"


def caption(rng, scene: Scene) -> str:
  """One caption: every event with its count, pitch, loudness and tempo, plus the order."""
  fg = scene.foreground
  if scene.structure == "single":
    e = fg[0]
    text = clause(rng, e) if rng.random() < 0.6 else f"{noun_phrase(rng, e)} can be heard"
  elif scene.structure == "sequence":
    text = _sequence(rng, fg)
  elif scene.structure == "overlap":
    a, b = fg if rng.random() < 0.5 else fg[::-1]
    form = int(rng.integers(4))
    if form == 0:
      text = f"{clause(rng, a)} while {clause(rng, b)}"
    elif form == 1:
      text = f"{clause(rng, a)} as {clause(rng, b)}"
    elif form == 2:
      text = f"{clause(rng, a)} and at the same time {clause(rng, b)}"
    else:
      text = f"{noun_phrase(rng, a)} together with {noun_phrase(rng, b)}"
  else:
    bg = next(e for e in scene.events if e.background)
    front = _sequence(rng, fg)
    form = int(rng.integers(4))
    if form == 0:
      text = f"{front} with {noun_phrase(rng, bg)} in the background"
    elif form == 1:
      text = f"{front}, with {gerund_phrase(rng, bg)} in the background"
    elif form == 2:
      text = f"in the background {clause(rng, bg)}, while {front}"
    else:
      text = f"over {noun_phrase(rng, bg)}, {front}"
  return text[0].upper() + text[1:] + "."


def captions(scene: Scene, seed: int, n: int = 5) -> list[str]:
  """`n` paraphrases; distinct when the templates allow it."""
  rng = np.random.default_rng([seed, 7])
  out: list[str] = []
  for _ in range(20 * n):
    text = caption(rng, scene)
    if text not in out:
      out.append(text)
    if len(out) == n:
      break
  while len(out) < n:
    out.append(out[len(out) % max(1, len(out))])
  return out


# ------------------------------------------------------------------------------ writing
@dataclasses.dataclass(frozen=True)
class Params:
  """Generator parameters; together with the code VERSION they determine every byte.

  Attributes:
    seed: the seed of everything.
    clips: clips per split, e.g. {'train': 1000, 'validation': 200, 'test': 200}.
    clip_seconds: the length of every clip.
    sample_rate: the rate of the WAV files.
    family_size: clips per family (base scene + contrasting siblings), >= 2.
  """

  seed: int
  clips: dict
  clip_seconds: float
  sample_rate: int
  family_size: int = 3

  def to_json(self) -> dict:
    return {"version": VERSION, **dataclasses.asdict(self)}


def split_scenes(params: Params, split: str) -> list[Scene]:
  """The scenes of a split in clip order: whole families, truncated to the clip count."""
  count = params.clips.get(split, 0)
  scenes: list[Scene] = []
  family = 0
  while len(scenes) < count:
    scenes += family_scenes(params.seed, split, family, params.family_size,
                            params.clip_seconds)
    family += 1
  return scenes[:count]


def file_name(split: str, index: int) -> str:
  return f"synthcaps_{split}_{index:06d}.wav"


def _clip_seed(params: Params, split: str, scene: Scene) -> list[int]:
  # Per family, not per clip: siblings share the noise and pitch jitter of shared events.
  return [params.seed, _SPLIT_IDS[split], scene.family, 1]


def _write_clip(args) -> int:
  path, scene, params, split = args
  seed = int(np.random.default_rng(_clip_seed(params, split, scene)).integers(2**31))
  x = render(scene, sr=params.sample_rate, clip_seconds=params.clip_seconds, seed=seed)
  buf = io.BytesIO()
  soundfile.write(buf, audio_io.to_int16(x), params.sample_rate, subtype="PCM_16",
                  format="WAV")
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written WAV
  return len(x)


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  tmp.write_text(text, encoding="utf-8", newline="")
  os.replace(tmp, path)


def generate(out_dir: os.PathLike | str, params: Params, *, num_workers: int = 1,
             progress: bool = True) -> dict:
  """Writes the synthcaps files (module docstring) into `out_dir`; resumable.

  Args:
    out_dir: the folder to write; a rerun with the same parameters writes only what is
      missing, one with different parameters raises.
    params: the generator parameters.
    num_workers: processes rendering audio (the output does not depend on it).
    progress: show a tqdm bar.

  Returns:
    {split: number of clips}.

  Raises:
    ValueError: `out_dir` holds a synthcaps set made with other parameters, or the
      parameters are unusable.
  """
  _check_params(params)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  _claim_out_dir(out_dir, params)
  jobs, tables = _plan_splits(out_dir, params)
  _render_clips(jobs, num_workers=num_workers, progress=progress)
  # Tables last: their presence marks a split whose audio is complete.
  _write_tables(out_dir, tables)
  return {split: len(rows) for split, (rows, _) in tables.items()}


def _check_params(params: Params) -> None:
  if params.clip_seconds < _MIN_CLIP_SECONDS:
    raise ValueError(f"clip_seconds must be >= {_MIN_CLIP_SECONDS}, got {params.clip_seconds}")
  if params.family_size < 2:
    raise ValueError(f"family_size must be >= 2 (siblings are the point), got "
                     f"{params.family_size}")
  unknown = set(params.clips) - set(SPLITS)
  if unknown:
    raise ValueError(f"unknown synthcaps splits {sorted(unknown)}; known: {list(SPLITS)}")


def _claim_out_dir(out_dir: pathlib.Path, params: Params) -> None:
  """Writes synthcaps_params.json, or checks that the one there matches `params`."""
  params_path = out_dir / "synthcaps_params.json"
  if params_path.exists():
    found = json.loads(params_path.read_text(encoding="utf-8"))
    if found != json.loads(json.dumps(params.to_json())):
      raise ValueError(
          f"{out_dir} holds a synthcaps set generated with {found}, not "
          f"{params.to_json()}; delete the folder or choose another --manual_dir")
  else:
    _atomic_write_text(params_path, json.dumps(params.to_json(), indent=1))


def _plan_splits(out_dir: pathlib.Path, params: Params) -> tuple[list, dict]:
  """The clips still to render (jobs for `_write_clip`) and each split's (rows, truth)."""
  jobs, tables = [], {}
  for split, folder in SPLITS.items():
    if not params.clips.get(split):
      continue
    (out_dir / folder).mkdir(exist_ok=True)
    scenes = split_scenes(params, split)
    rows, truth = [], []
    for index, scene in enumerate(scenes):
      name = file_name(split, index)
      caps = captions(scene, seed=int(np.random.default_rng(
          [params.seed, _SPLIT_IDS[split], index, 2]).integers(2**31)))
      rows.append([name] + caps)
      truth.append({"file_name": name, **scene.to_json()})
      path = out_dir / folder / name
      if not path.exists():
        jobs.append((str(path), scene, params, split))
    tables[split] = (rows, truth)
  return jobs, tables


def _render_clips(jobs: list, *, num_workers: int, progress: bool) -> None:
  bar = None
  if progress and jobs:
    import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm.tqdm(total=len(jobs), desc="synthcaps audio", unit="clip")
  if num_workers > 1 and len(jobs) > 1:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
      for _ in pool.map(_write_clip, jobs, chunksize=8):
        if bar:
          bar.update()
  else:
    for job in jobs:
      _write_clip(job)
      if bar:
        bar.update()
  if bar:
    bar.close()


def _write_tables(out_dir: pathlib.Path, tables: dict) -> None:
  for split, (rows, truth) in tables.items():
    folder = SPLITS[split]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")  # CRLF like the official Clotho CSVs.
    writer.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
    writer.writerows(rows)
    _atomic_write_text(out_dir / f"synthcaps_ground_truth_{folder}.jsonl",
                       "".join(json.dumps(t, sort_keys=True) + "\n" for t in truth))
    _atomic_write_text(out_dir / f"clotho_captions_{folder}.csv", buf.getvalue())
