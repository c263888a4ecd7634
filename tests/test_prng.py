"""The CPU program's threefry gives JAX's random numbers, bit for bit,
without the temporaries of XLA:CPU's threefry loop."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxlab import models, platforms, prng, steps


@pytest.mark.parametrize('sample', [
    lambda key: jax.random.bits(key, (5,)),
    lambda key: jax.random.bits(key, (33, 7), dtype=jnp.uint8),
    lambda key: jax.random.bits(key, (4, 3), dtype=jnp.uint16),
    lambda key: jax.random.normal(jax.random.split(key, 3)[2], (100, 33)),
    lambda key: jax.random.uniform(jax.random.fold_in(key, 7), (17,),
                                   dtype=jnp.bfloat16),
    lambda key: jax.random.truncated_normal(key, -2.0, 2.0, (64, 3, 3, 8)),
    lambda key: jax.random.bernoulli(key, 0.3, (1000,)),
])
def test_unrolled_threefry_gives_jaxs_numbers(sample):
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(sample(prng.unrolled(key)), sample(key))
  typed = jax.random.key(3)
  np.testing.assert_array_equal(sample(prng.unrolled(typed)), sample(key))


def test_unrolled_threefry_stores_nothing_but_its_result():
  shape = (1024, 1024)  # 4 MiB of random numbers.
  def temporaries(key):
    compiled = jax.jit(lambda k: jax.nn.initializers.lecun_normal()(
        k, shape)).lower(key).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  assert temporaries(jax.random.PRNGKey(0)) >= 2 * 4 << 20  # XLA's loop.
  assert temporaries(prng.unrolled(jax.random.PRNGKey(0))) < 1 << 20


@pytest.mark.parametrize('name', ['fc', 'cnn_bn', 'scratch_cnn', 'resnet18'])
def test_initial_parameters_are_the_plain_programs(name):
  model = models.create_model(ml_collections.ConfigDict({'name': name}), 5,
                              axis_name=steps.AXIS)
  rng = jax.random.PRNGKey(0)
  optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.1, momentum=0.9, grad_clip_norm=0.0,
      frozen=()))
  state = steps.create_train_state(model, optimizer, rng, (32, 32, 3))
  init_rng, _ = jax.random.split(rng)
  with platforms.tracing_cpu_program(False):
    plain = jax.jit(functools.partial(model.init, train=False),
                    compiler_options={'xla_backend_optimization_level': 0})(
                        {'params': init_rng, 'dropout': init_rng},
                        jnp.zeros((1, 32, 32, 3)))
  for got, want in zip(jax.tree.leaves(state.params),
                       jax.tree.leaves(plain['params'])):
    np.testing.assert_array_equal(got, want)
