"""The fast max-pool gives flax's max-pool outputs and gradients exactly;
XLA defaults."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import ops


def _outputs_and_grads(pool, x, cotangent):
  out, vjp = jax.vjp(pool, x)
  return out, vjp(cotangent)[0]


@pytest.mark.parametrize('shape,k', [((2, 8, 8, 3), 2), ((2, 7, 9, 4), 2),
                                     ((1, 10, 11, 2), 3)])
@pytest.mark.parametrize('ties', [False, True])
def test_max_pool_matches_flax(shape, k, ties):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  if ties:  # Few distinct values: most windows hold several maxima.
    x = np.round(x).clip(0, 1)
  out_shape = (shape[0], shape[1] // k, shape[2] // k, shape[3])
  cotangent = rng.normal(size=out_shape).astype(np.float32)
  ours = _outputs_and_grads(jax.jit(lambda v: ops.max_pool(v, k)), x,
                            cotangent)
  plain = _outputs_and_grads(
      jax.jit(lambda v: nn.max_pool(v, (k, k), strides=(k, k))), x, cotangent)
  np.testing.assert_array_equal(ours[0], plain[0])
  np.testing.assert_array_equal(ours[1], plain[1])


def test_xla_defaults_are_applied_on_import_and_yield_to_the_user(monkeypatch):
  from jaxlab import runtime
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  runtime.apply_xla_defaults()
  assert os.environ['XLA_FLAGS'] == (
      '--xla_force_host_platform_device_count=2 '
      '--xla_cpu_experimental_ynn_fusion_type=')
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot')
  runtime.apply_xla_defaults()
  assert os.environ['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=dot'
