"""Report B's pieces: the scratch CNN, VGG16's size, freezing presets and
augmentation."""

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from configs import vgg_finetune
from jaxlab import models
from jaxlab import steps
from jaxlab import summary
from jaxlab.preprocessing import Preprocess
from jaxlab.preprocessing import rotate_nearest
from tests.conftest import train_checking_freezing


def test_scratch_cnn_has_report_b_layer_sizes():
  model = models.ScratchCNN(num_classes=15)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  p = variables['params']
  assert p['conv1']['kernel'].shape == (3, 3, 3, 16)
  assert p['conv2']['kernel'].shape == (3, 3, 16, 16)
  assert p['head']['kernel'].shape == (54 * 54 * 16, 15) == (46_656, 15)


def test_scratch_dropout_is_random_in_training_only():
  model = models.ScratchCNN(num_classes=3, dropout_rate=0.25)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 20, 20, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
  assert not jnp.allclose(a, b)
  np.testing.assert_array_equal(model.apply(variables, x),
                                model.apply(variables, x))


def test_vgg16_has_torchvisions_parameter_count_and_names():
  s = summary.summarize(models.VGG16(num_classes=1000), (224, 224, 3), 1)
  assert s.total_params == 138_357_544
  names = [layer.name for layer in s.layers]
  assert names[:2] == ['features.0', 'features.2']
  assert 'features.28' in names and 'classifier.6' in names


def test_vgg16_summary_needs_no_weights_and_counts_frozen():
  config = vgg_finetune.get_config()
  config.optimizer.frozen = ('features',)
  s = summary.summarize_config(config)
  assert s.non_trainable_params == 14_714_688  # VGG16's 13 convolutions.
  assert s.trainable_params == s.total_params - 14_714_688


PRESETS = {
    'first15': ('features[0:15]',),
    'second15': ('features[15:30]',),
    'all_features': ('features',),
    'classifier': ('classifier',),
    'nothing': (),
}


def _small_vgg_state(frozen):
  model = models.VGG16(num_classes=5, widths=(4, 8, 8, 16, 16),
                       classifier_width=32, dropout_rate=0.0)
  optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.01, momentum=0.9, grad_clip_norm=0.5,
      frozen=frozen))
  return steps.create_train_state(model, optimizer, jax.random.PRNGKey(0),
                                  (32, 32, 3))


CONVS = [f'features.{i}' for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24,
                                   26, 28)]
FROZEN_LAYERS = {
    'first15': set(CONVS[:7]),
    'second15': set(CONVS[7:]),
    'all_features': set(CONVS),
    'classifier': {'classifier.0', 'classifier.3', 'classifier.6'},
    'nothing': set(),
}


@pytest.mark.parametrize('preset', sorted(PRESETS))
def test_freezing_preset(preset):
  state = _small_vgg_state(PRESETS[preset])
  frozen = state.frozen
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 255, (1, 4, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 5, (1, 4)).astype(np.int32)}
  assert {k[0] for k in frozen} == FROZEN_LAYERS[preset]
  # Momentum only where trainable (after the clipping, in the chain).
  final = train_checking_freezing(
      state, batch, lambda opt_state: opt_state.inner_states[
          'trainable'].inner_state[1][0].trace, num_steps=3)
  assert final.opt_state.inner_states['frozen'].inner_state == \
      optax.EmptyState()
  if preset != 'second15':
    return
  # The first step's reported gradient norm: trainable parameters only.
  def loss(params):
    logits = state.apply_fn({'params': params}, Preprocess()(batch['image'][0]),
                            train=True)
    return steps.cross_entropy(logits, batch['label'][0]).mean()
  p_train, _ = steps.pmapped_steps(Preprocess())
  _, first = p_train(steps.replicate(state), batch)
  grads = flax.traverse_util.flatten_dict(jax.jit(jax.grad(loss))(state.params))
  trainable_norm = np.sqrt(sum(np.sum(np.square(g)) for k, g in grads.items()
                               if k not in frozen))
  np.testing.assert_allclose(first.grad_norm.compute()[0], trainable_norm,
                             rtol=1e-4)


def test_rotation_matches_pil_nearest():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)
  for degrees in (0.65, -10.0, 90.0):
    expected = np.asarray(Image.fromarray(image).rotate(degrees,
                                                        Image.NEAREST))
    np.testing.assert_array_equal(rotate_nearest(image, degrees), expected)


def test_augmentation_is_per_example_seeded_and_covers_both_flips():
  images = np.tile(np.arange(6, dtype=np.uint8)[None, None, :, None],
                   (16, 6, 1, 3))
  flip = Preprocess(hflip=True)
  rng = jax.random.PRNGKey(3)
  out = np.asarray(flip.augment(rng, images, jnp.arange(16)))
  flipped = [bool(np.array_equal(o, im[:, ::-1])) for o, im in zip(out, images)]
  assert all(f or np.array_equal(o, im) for f, o, im in
             zip(flipped, out, images))
  assert 0 < sum(flipped) < 16
  # Example 5's augmentation depends on its id, not on its batch neighbours.
  alone = np.asarray(flip.augment(rng, images[5:6], jnp.arange(5, 6)))
  np.testing.assert_array_equal(alone[0], out[5])
  # Evaluation (no key) never augments; normalisation follows.
  norm = Preprocess(hflip=True, mean=(0.5,) * 3, std=(0.25,) * 3)
  np.testing.assert_allclose(norm(images), (images / 255 - 0.5) / 0.25,
                             rtol=1e-6)
