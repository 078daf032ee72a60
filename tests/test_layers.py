"""layers.keep_mask: JAX's own dropout masks, drawn faster, compiled once, sharded."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hade_jax import layers, sharding


def _compiled_text(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def _draws_in_a_loop(draw, key) -> bool:
  jaxpr = str(jax.make_jaxpr(draw)(key))
  in_loop = "scan[" in jaxpr or "while[" in jaxpr
  assert in_loop != ("random_bits[" in jaxpr)  # one way or the other, never both
  return in_loop


@pytest.mark.parametrize("shape", [(4, 96, 300), (3, 5, 7001), (1, 40000), (40000, 1),
                                   (2, 12, 77, 77)])
def test_keep_mask_is_jax_bernoulli_bit_for_bit(shape):
  key = jax.random.fold_in(jax.random.key(3), 7)
  for keep_prob in (0.9, 0.5, 0.1):
    expected = jax.jit(lambda k, p=keep_prob: jax.random.bernoulli(k, p, shape))(key)
    drawn = jax.jit(lambda k, p=keep_prob: layers.keep_mask(k, p, shape))(key)
    assert drawn.shape == shape and drawn.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(expected))
  # These masks take the chunked loop (a loop of their own), not jax.random's random_bits.
  assert _draws_in_a_loop(lambda k: layers.keep_mask(k, 0.9, shape), key)


def test_small_masks_and_rbg_keys_take_jax_random_itself():
  threefry, rbg = jax.random.key(5), jax.random.key(5, impl="rbg")
  for key, shape in ((threefry, (16, 1, 1)), (threefry, (4, 64)), (rbg, (4, 96, 300))):
    drawn = layers.keep_mask(key, 0.8, shape)
    np.testing.assert_array_equal(np.asarray(drawn),
                                  np.asarray(jax.random.bernoulli(key, 0.8, shape)))
    assert not _draws_in_a_loop(lambda k, s=shape: layers.keep_mask(k, 0.8, s), key)


def test_under_x64_the_masks_are_still_jax_bernoulli():
  """With 64-bit floats enabled jax.random.bernoulli compares a float64 uniform drawn from 64
  random bits; keep_mask then leaves the mask to it rather than draw other bits."""
  shape = (4, 96, 300)
  with jax.enable_x64(True):
    key = jax.random.key(5)
    np.testing.assert_array_equal(np.asarray(layers.keep_mask(key, 0.9, shape)),
                                  np.asarray(jax.random.bernoulli(key, 0.9, shape)))
    assert not _draws_in_a_loop(lambda k: layers.keep_mask(k, 0.9, shape), key)


def test_the_backward_reuses_the_forward_mask_without_a_second_hash():
  """Each mask's hash is compiled once: the gradient's program has exactly as many of the
  hash's rotations (shift-left ops) as the forward's, and two masks twice as many as one."""
  x = jnp.linspace(-1.0, 1.0, 4 * 96 * 300).reshape(4, 96, 300)

  def loss(x, key, masks=2):
    y = x
    for i in range(masks):
      y = jnp.tanh(layers.dropout(y, 0.1 + 0.2 * i, nnx.Rngs(dropout=jax.random.fold_in(key, i))))
      y = y * x
    return jnp.sum(y ** 2)

  key = jax.random.key(0)
  rotations = lambda fn: len(re.findall(r"shift-left\(", _compiled_text(fn, x, key)))
  one = rotations(lambda x, k: loss(x, k, masks=1))
  two = rotations(loss)
  assert one >= 20  # the 20 rounds of threefry, written out
  assert two == 2 * one
  assert rotations(jax.grad(loss)) == two
  assert rotations(jax.value_and_grad(loss)) == two


def test_on_a_mesh_each_device_draws_only_its_shard_of_the_batch():
  mesh = sharding.make_mesh((("data", 8), ("fsdp", 1)))
  batch_sharding = sharding.batch_sharding(mesh)
  x = jax.device_put(np.ones((16, 4096, 8), np.float32), batch_sharding)

  def drop(x, key):
    return layers.dropout(x, 0.5, nnx.Rngs(dropout=key))

  key = jax.random.key(11)
  sharded = jax.jit(drop, in_shardings=(batch_sharding, None), out_shardings=batch_sharding)
  text = sharded.lower(x, key).compile().as_text()
  masks = set(re.findall(r"pred\[(\d+),", text))
  assert masks and masks <= {"2"}, masks  # 16 examples over 8 devices: 2 each, never 16
  np.testing.assert_array_equal(np.asarray(sharded(x, key)),
                                np.asarray(jax.jit(drop)(np.ones((16, 4096, 8), np.float32), key)))


def test_under_vmap_each_key_draws_its_own_bernoulli_mask():
  keys = jax.random.split(jax.random.key(2), 3)
  shape = (4, 96, 300)
  drawn = jax.vmap(lambda k: layers.keep_mask(k, 0.9, shape))(keys)
  expected = jax.vmap(lambda k: jax.random.bernoulli(k, 0.9, shape))(keys)
  np.testing.assert_array_equal(np.asarray(drawn), np.asarray(expected))
  assert not (np.asarray(drawn[0]) == np.asarray(drawn[1])).all()
  # A key array outside vmap is JAX's own error, as for jax.random.bernoulli.
  with pytest.raises(ValueError, match="single key"):
    layers.keep_mask(keys, 0.9, shape)
