"""Model shapes and parameter counts, and the --summary table."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cnn2 as cnn2_config
from jaxlab import models
from jaxlab import onednn
from jaxlab import platforms
from jaxlab import summary
from jaxlab.errors import UserError


def _model(name, **fields):
  return models.create_model(
      ml_collections.ConfigDict(dict(name=name, **fields)), num_classes=10)


def _params(model, shape):
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  return variables, summary.count_params(variables['params'])


def test_cnn2_has_report_a_parameter_count():
  variables, n = _params(_model('cnn2'), (1, 180, 180, 4))
  assert n == 28_970_058
  assert variables['params']['dense1']['kernel'].shape == (42 * 42 * 64, 256)


def test_fc_layer_sizes():
  variables, n = _params(_model('fc'), (1, 180, 180, 4))
  p = variables['params']
  assert p['dense1']['kernel'].shape == (129_600, 512)
  assert p['dense2']['kernel'].shape == (512, 256)
  assert p['head']['kernel'].shape == (256, 10)
  assert n == 129_600 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10


def test_cnn1_pools_halve_with_padding():
  variables, _ = _params(_model('cnn1'), (1, 180, 180, 4))
  # 180 -> 90 -> 45 through two 3x3/2 pools with padding 1.
  assert variables['params']['dense1']['kernel'].shape == (45 * 45 * 32, 256)


@pytest.mark.parametrize('name', ['fc', 'cnn1', 'cnn2', 'cnn_bn'])
@pytest.mark.parametrize('train', [False, True])
def test_output_shape(name, train):
  model = _model(name)
  x = jnp.ones((3, 36, 36, 4))
  variables = model.init(jax.random.PRNGKey(0), x)
  logits, _ = model.apply(variables, x, train=train, mutable=['batch_stats'])
  assert logits.shape == (3, 10)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_cnn_bn_keeps_batch_stats_and_updates_them_in_training():
  model = _model('cnn_bn')
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 4))
  variables = model.init(jax.random.PRNGKey(0), x)
  stats = variables['batch_stats']
  assert set(stats) == {'bn1', 'bn2', 'bn3', 'bn4'}
  _, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert not jnp.allclose(updated['batch_stats']['bn1']['mean'],
                          stats['bn1']['mean'])
  assert 'batch_stats' not in _model('cnn1').init(jax.random.PRNGKey(0), x)


def test_activation_changes_fc():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  relu, sigmoid = _model('fc'), _model('fc', activation='sigmoid')
  variables = relu.init(jax.random.PRNGKey(0), x)
  assert not jnp.allclose(relu.apply(variables, x), sigmoid.apply(variables, x))


def test_unknown_model_and_field_are_named():
  with pytest.raises(UserError, match=r"model.name='resnet'.*cnn1"):
    _model('resnet')
  with pytest.raises(UserError, match=r'model.width is not an option'):
    _model('fc', width=3)
  with pytest.raises(UserError, match=r"model.activation='tanh'"):
    _params(_model('fc', activation='tanh'), (1, 8, 8, 1))


def test_summary_matches_report_a_fig1():
  text = summary.summarize_config(cnn2_config.get_config()).to_text()
  lines = text.splitlines()
  assert lines[-3:] == ['Total params: 28,970,058',
                        'Trainable params: 28,970,058',
                        'Non-trainable params: 0']
  assert 'Total mult-adds (G): 48.02' in text
  assert any(l.startswith('conv1') and '[64, 178, 178, 32]' in l
             and '1,184' in l for l in lines)


def test_summary_counts_frozen_as_non_trainable():
  config = cnn2_config.get_config()
  config.optimizer.frozen = (r'conv\d\.',)
  s = summary.summarize_config(config)
  assert s.non_trainable_params == 1_184 + 9_248 + 18_496 + 36_928
  assert s.trainable_params == 28_970_058 - s.non_trainable_params


# One model per kind of layer: Dense; Conv, BatchNorm and the overlapping
# pool; VGG's max-pool, adaptive pool and dropout.
@pytest.mark.parametrize('cpu_program', [False, True])
@pytest.mark.parametrize('name', ['fc', 'cnn_bn', 'vgg16'])
def test_half_precision_computes_in_bfloat16_and_keeps_float32_state(
    name, cpu_program):
  """In flax's program and in the CPU one (oneDNN's bfloat16 layers where
  the CPU has bfloat16 instructions): bfloat16 logits close to float32's;
  parameters' gradients and BatchNorm statistics float32."""
  fields = dict(name=name)
  if name == 'vgg16':
    fields.update(widths=(4, 4, 8, 8, 8), classifier_width=16)
  config = ml_collections.ConfigDict(fields)
  full = models.create_model(config, num_classes=10)
  half = models.create_model(config, num_classes=10, dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
  # LLVM's optimisations make initialisation compile for seconds.
  variables = jax.jit(full.init, compiler_options={
      'xla_backend_optimization_level': 0})(jax.random.PRNGKey(0), x)

  @jax.jit
  @platforms.tracing_cpu_program(cpu_program)
  def run(variables):
    def loss(params):
      logits, updates = half.apply(
          {**variables, 'params': params}, x, train=True,
          mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(2)})
      return logits.astype(jnp.float32).sum(), (logits, updates)
    grads, (logits, updates) = jax.grad(loss, has_aux=True)(
        variables['params'])
    evaluate = lambda model: model.apply(variables, x)
    return grads, logits, updates, evaluate(half), evaluate(full)

  grads, logits, updates, half_logits, full_logits = run(variables)
  assert logits.dtype == half_logits.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(
      (grads, updates, jax.eval_shape(half.init, jax.random.PRNGKey(0), x))))
  scale = float(jnp.abs(full_logits).max())
  np.testing.assert_allclose(half_logits.astype(jnp.float32), full_logits,
                             atol=0.05 * scale + 1e-3)


def test_half_precision_without_bfloat16_instructions_is_float32(
    monkeypatch, caplog):
  """Where bfloat16 would run slower than float32 (no AVX512-BF16 or AMX),
  half_precision computes in float32 and says so, once."""
  monkeypatch.setattr(onednn, 'bfloat16_supported', lambda: False)
  models._warn_no_bfloat16.cache_clear()
  with caplog.at_level('WARNING'):
    dtypes = [models.compute_dtype(True) for _ in range(2)]
  assert dtypes == [jnp.float32] * 2
  warnings = [r.getMessage() for r in caplog.records
              if 'no bfloat16 instructions' in r.getMessage()]
  assert len(warnings) == 1 and 'computing in float32' in warnings[0]
  monkeypatch.setattr(onednn, 'bfloat16_supported', lambda: True)
  assert models.compute_dtype(True) == jnp.bfloat16
  assert models.compute_dtype(False) == jnp.float32
