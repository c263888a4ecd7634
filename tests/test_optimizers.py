"""Optimizer math against hand-computed values, and freezing masks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxlab import optimizers
from jaxlab.errors import UserError


def _config(**fields):
  base = dict(name='sgd', learning_rate=0.1, grad_clip_norm=0.0, frozen=())
  return ml_collections.ConfigDict({**base, **fields})


def _run(tx, params, grads_seq):
  state = tx.init(params)
  out = []
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out, state


def test_rmsprop_matches_equation_1_by_hand():
  # lr 0.01, a 0.99, eps 1e-8, B 0.9; w0 = (1, -2); g1 = (0.5, -1), g2 = (0.2, 0.4)
  # Step 1: G1 = 0.01 g1^2 = (0.0025, 0.01)
  #         D1 = -0.01 g1 / sqrt(G1 + 1e-8) = (-0.0999998, 0.09999995)
  # Step 2: G2 = 0.99 G1 + 0.01 g2^2 = (0.002875, 0.0115)
  #         D2 = 0.9 D1 - 0.01 g2 / sqrt(G2 + 1e-8)
  #            = (-0.08999982 - 0.03729995, 0.08999996 - 0.03730018)
  tx = optimizers.rmsprop_momentum(0.01, alpha=0.99, eps=1e-8, momentum=0.9)
  params = {'w': jnp.array([1.0, -2.0])}
  grads = [{'w': jnp.array([0.5, -1.0])}, {'w': jnp.array([0.2, 0.4])}]
  (w1, w2), _ = _run(tx, params, grads)
  np.testing.assert_allclose(w1['w'], [0.9000002, -1.90000005], rtol=1e-6)
  np.testing.assert_allclose(w2['w'], [0.77270025, -1.84730027], rtol=1e-6)


def test_rmsprop_eps_is_inside_the_square_root():
  # With G = 0 (zero gradient) the step is 0 either way; with a tiny
  # gradient, eps inside the root dominates: step = lr*g/sqrt(eps*(1)).
  tx = optimizers.rmsprop_momentum(1.0, alpha=0.0, eps=1e-2, momentum=0.0)
  (w1,), _ = _run(tx, {'w': jnp.zeros(1)}, [{'w': jnp.array([0.1])}])
  np.testing.assert_allclose(w1['w'], [-0.1 / np.sqrt(0.01 + 0.01)], rtol=1e-6)


def test_sgd_momentum_follows_pytorch_convention():
  # v1 = g1 = 1; w1 = -0.1.  v2 = 0.9 * 1 + 2 = 2.9; w2 = -0.1 - 0.29 = -0.39.
  tx = optimizers.sgd(0.1, momentum=0.9)
  (w1, w2), _ = _run(tx, {'w': jnp.zeros(1)},
                     [{'w': jnp.ones(1)}, {'w': jnp.full(1, 2.0)}])
  np.testing.assert_allclose(w1['w'], [-0.1], rtol=1e-6)
  np.testing.assert_allclose(w2['w'], [-0.39], rtol=1e-6)


def _params():
  return {'conv1': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
          'head': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}}


def test_clipping_scales_by_global_norm():
  # Global norm of the gradients = sqrt(4 * 9 + 2 * 9 + 6 * 0) = sqrt(54).
  params = _params()
  grads = jax.tree.map(lambda p: 3.0 * p, params)
  grads['head'] = jax.tree.map(jnp.zeros_like, grads['head'])
  labels = optimizers.frozen_mask(params, ())
  tx = optimizers.create_optimizer(_config(learning_rate=1.0,
                                           grad_clip_norm=0.5), labels)
  (new,), _ = _run(tx, params, [grads])
  np.testing.assert_allclose(new['conv1']['kernel'],
                             1 - 3 * 0.5 / np.sqrt(54), rtol=1e-6)


def test_frozen_parameters_get_no_update_state_or_clipping_share():
  params = _params()
  labels = optimizers.frozen_mask(params, [r'conv1\.'])
  assert labels == {'conv1': {'kernel': 'frozen', 'bias': 'frozen'},
                    'head': {'kernel': 'trainable', 'bias': 'trainable'}}
  tx = optimizers.create_optimizer(
      _config(learning_rate=1.0, momentum=0.9, grad_clip_norm=1.0), labels)
  grads = jax.tree.map(lambda p: 10.0 * p, params)
  (new,), state = _run(tx, params, [grads])
  np.testing.assert_array_equal(new['conv1']['kernel'], params['conv1']['kernel'])
  # Clipped by the norm of the head's gradients alone: sqrt(9 * 100) = 30.
  np.testing.assert_allclose(new['head']['kernel'], 1 - 10 / 30, rtol=1e-6)
  state_leaves = jax.tree.leaves(state.inner_states['frozen'])
  assert state_leaves == []
  trainable_leaves = jax.tree.leaves(state.inner_states['trainable'])
  # Momentum for the head's 6 + 3 parameters only.
  assert sum(x.size for x in trainable_leaves) == 9


def _gradient_tree(scale):
  rng = np.random.default_rng(4)
  shapes = {'kernel': (37, 5), 'conv': (3, 3, 2, 4), 'bias': (5,),
            'scalar': ()}
  return {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32)
          for k, s in shapes.items()}


def test_global_norm_matches_optax():
  tree = _gradient_tree(1.0)
  np.testing.assert_allclose(optimizers.global_norm(tree),
                             optax.tree.norm(tree), rtol=1e-6)


@pytest.mark.parametrize('scale', [0.01, 10.0])  # Under and over the norm.
def test_clip_by_global_norm_matches_optax(scale):
  tree = _gradient_tree(scale)
  ours, _ = optimizers.clip_by_global_norm(1.0).update(tree, None)
  theirs, _ = optax.clip_by_global_norm(1.0).update(tree, None)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               ours, theirs)


def test_bad_names_and_patterns_are_reported():
  labels = optimizers.frozen_mask(_params(), ())
  with pytest.raises(UserError, match=r"optimizer.name='adamw'"):
    optimizers.create_optimizer(_config(name='adamw'), labels)
  with pytest.raises(UserError, match=r'optimizer.beta is not an option'):
    optimizers.create_optimizer(_config(beta=0.1), labels)
  with pytest.raises(UserError, match=r"pattern 'features' matches no"):
    optimizers.frozen_mask(_params(), ['features'])
  with pytest.raises(UserError, match=r'not a regular expression'):
    optimizers.frozen_mask(_params(), ['conv1('])


def test_options_of_other_optimizers_are_ignored():
  labels = optimizers.frozen_mask(_params(), ())
  config = _config(name='sgd', alpha=0.99, eps=1e-8, momentum=0.9)
  optimizers.create_optimizer(config, labels)  # No error: rmsprop's options.
