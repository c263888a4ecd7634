"""JAX's threefry random numbers, computed as one elementwise pass on CPU.

XLA:CPU runs JAX's Threefry-2x32 hash as a loop over its five groups of
rounds, which stores its whole state between groups: random bits for an
array of N words took temporaries of 3N words (VGG16's 392 MiB classifier
kernel: 1,176 MiB), which set the peak memory of a run at its
initialisation. `UNROLLED_THREEFRY` is a PRNG implementation that gives the
same bits, from the same keys, as JAX's default (threefry, partitionable
bits): its seed, split and fold-in are JAX's own, and its random bits are
the hash with its twenty rounds written out on a counter, which XLA fuses
into one pass that stores nothing but its result. `steps.create_train_state`
initialises parameters with it in the XLA:CPU program; tests check that the
parameters equal those of the default implementation bit for bit.
"""

import math

import jax
from jax import lax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np

_THREEFRY = jex_random.threefry_prng_impl
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # Threefry's key schedule constant.


def _rotate_left(x, bits: int):
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry_2x32(k0, k1, x0, x1):
  """Threefry-2x32 (20 rounds) of the counter words (x0, x1) under the key
  (k0, k1), elementwise: the pair of hashed words."""
  keys = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0, x1 = x0 + keys[0], x1 + keys[1]
  for group in range(5):
    for rotation in _ROTATIONS[group % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, rotation) ^ x0
    x0 = x0 + keys[(group + 1) % 3]
    x1 = x1 + keys[(group + 2) % 3] + np.uint32(group + 1)
  return x0, x1


def _random_bits(key, bit_width: int, shape):
  """The bits of JAX's partitionable threefry: the hash of each element's
  index in the array, as a 64-bit counter, its two words xor-ed."""
  size = math.prod(shape)
  if (bit_width == 64 or size >= 2**32 or
      not jax.config.values['jax_threefry_partitionable']):
    return _THREEFRY.random_bits(key, bit_width, shape)
  index = lax.iota(np.uint32, size).reshape(shape)
  high, low = threefry_2x32(key[0], key[1], jnp.zeros_like(index), index)
  bits = high ^ low
  return bits if bit_width == 32 else bits.astype(f'uint{bit_width}')


UNROLLED_THREEFRY = jex_random.define_prng_impl(
    key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed,
    split=_THREEFRY.split, random_bits=_random_bits,
    fold_in=_THREEFRY.fold_in, name='threefry2x32_unrolled', tag='fry_u')


def unrolled(key):
  """`key` (a raw uint32 threefry key, or a typed one) as a key of
  UNROLLED_THREEFRY: the same random numbers."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return jax.random.wrap_key_data(key, impl=UNROLLED_THREEFRY)
