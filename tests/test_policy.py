"""data_pipelines/policy.py: the one crop/pad policy, on hand-computed cases."""

import numpy as np
import pytest

from data_pipelines import policy


@pytest.mark.parametrize("pad_mode,expected,valid", [
    ("zeros", [1, 2, 3, 0, 0, 0, 0], 3),
    ("repeat", [1, 2, 3, 1, 2, 3, 1], 7),
    ("repeatpad", [1, 2, 3, 1, 2, 3, 0], 6),  # HF ClapFeatureExtractor's default
])
def test_short_clip_pad_modes(pad_mode, expected, valid):
  wave = np.array([1, 2, 3], np.int16)
  out, n = policy.fit_clip(wave, 7, pad_mode=pad_mode)
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == np.int16 and n == valid


@pytest.mark.parametrize("crop,start", [("head", 0), ("center", 3)])
def test_long_clip_crops(crop, start):
  wave = np.arange(10, dtype=np.float32)
  first = policy.crop_start(len(wave), 4, crop)
  assert first == start
  out, n = policy.fit_clip(wave, 4, start=first)
  np.testing.assert_array_equal(out, wave[start:start + 4])
  assert n == 4


def test_random_start_covers_the_clip_and_draws_nothing_for_short_clips():
  rng = np.random.default_rng(0)
  starts = {policy.crop_start(10, 4, "random", rng) for _ in range(200)}
  assert starts == set(range(7))
  state = rng.bit_generator.state
  assert policy.crop_start(3, 4, "random", rng) == 0
  assert rng.bit_generator.state == state  # a short clip consumes no randomness


def test_bad_requests_are_refused():
  with pytest.raises(ValueError, match="crop_start 7"):
    policy.fit_clip(np.zeros(10), 4, start=7)
  with pytest.raises(ValueError, match="unknown pad mode 'reflect'"):
    policy.fit_clip(np.zeros(3), 4, pad_mode="reflect")
  with pytest.raises(ValueError, match="mono"):
    policy.fit_clip(np.zeros((3, 2)), 4)
  with pytest.raises(ValueError, match="eval_crop='middle'"):
    policy.check_crop_policy("middle", "zeros")
  out, n = policy.fit_clip(np.zeros(0, np.float32), 4, pad_mode="repeat")
  assert n == 0 and out.shape == (4,)  # an empty clip is all padding in any mode
