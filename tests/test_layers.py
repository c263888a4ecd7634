"""jaxlab.layers: plain flax outside the CPU program; in it, jaxlab's CPU
implementations where they apply, with flax's outputs and gradients, and
flax's own layers everywhere else."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import layers
from jaxlab import onednn
from jaxlab import platforms

_ONEDNN = 'jaxlab_onednn'


def _loss(module, train_kwargs=None):
  """sum(sin(module(x))) and its gradients by params and x; batch_stats
  updates (if any) as aux."""
  def f(params, variables, x):
    out = module.apply({**variables, 'params': params}, x,
                       **(train_kwargs or {}))
    y, updates = out if train_kwargs and 'mutable' in train_kwargs else (
        out, {})
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), updates
  return jax.value_and_grad(f, argnums=(0, 2), has_aux=True)


def _run(module, variables, x, cpu: bool, train_kwargs=None):
  """Outputs and gradients, traced as the CPU program or the plain one;
  with the HLO text."""
  def f(params, rest, x):
    with platforms.tracing_cpu_program(cpu):
      return _loss(module, train_kwargs)(params, rest, x)
  rest = {k: v for k, v in variables.items() if k != 'params'}
  jitted = jax.jit(f)
  return (jitted(variables['params'], rest, x),
          jitted.lower(variables['params'], rest, x).as_text())


def _assert_same(module, x, *, fast: bool, tolerance=1e-5, train_kwargs=None,
                 flax_module=None, fast_dense=False, of_scale=False):
  """`module` has `flax_module`'s variables at initialisation; with non-zero
  parameters, the CPU program's outputs and gradients equal the plain
  program's (and flax's own). `fast`: whether the CPU program takes
  jaxlab's implementation and leaves XLA (oneDNN); `fast_dense`: whether it
  takes jaxlab's dense layer (which stays in XLA); `of_scale`: the absolute
  tolerance is `tolerance` times each array's largest magnitude (bfloat16:
  sums of rounded products err by a fraction of their terms, not of the
  result)."""
  variables = module.init(jax.random.PRNGKey(1), x)
  if flax_module is not None:
    jax.tree.map(np.testing.assert_array_equal, variables,
                 flax_module.init(jax.random.PRNGKey(1), x))
  variables = jax.tree.map(
      lambda v: v + 0.2 * jax.random.normal(jax.random.PRNGKey(2), v.shape,
                                            v.dtype), variables)
  mine, cpu_hlo = _run(module, variables, x, True, train_kwargs)
  plain, plain_hlo = _run(module, variables, x, False, train_kwargs)
  assert _ONEDNN not in plain_hlo
  # jaxlab's implementations define their gradients (custom VJPs); flax's
  # layers do not.
  apply = lambda cpu: lambda v, x: _traced(
      cpu, lambda: module.apply(v, x, **(train_kwargs or {})))
  jaxprs = [str(jax.make_jaxpr(apply(cpu))(variables, x))
            for cpu in (True, False)]
  assert ('custom_vjp' in jaxprs[0]) == (fast or fast_dense)
  assert 'custom_vjp' not in jaxprs[1]
  if onednn.available():
    assert (_ONEDNN in cpu_hlo) == fast, cpu_hlo[:2000]
  if flax_module is not None:
    theirs, _ = _run(flax_module, variables, x, True, train_kwargs)
    jax.tree.map(np.testing.assert_array_equal, plain, theirs)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tolerance,
      atol=tolerance * (float(jnp.max(jnp.abs(b))) if of_scale else 1)),
               mine, plain)
  assert jax.tree.map(jnp.dtype, mine) == jax.tree.map(jnp.dtype, plain)


def _x(shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(0), shape).astype(dtype)


@pytest.mark.parametrize('kwargs,fast', [
    (dict(features=5, kernel_size=(3, 3)), True),  # SAME.
    (dict(features=5, kernel_size=(3, 3), padding='VALID'), True),
    (dict(features=5, kernel_size=(3, 3), padding=((1, 0), (2, 1))), True),
    (dict(features=5, kernel_size=(3, 3), padding=1, use_bias=False), True),
    (dict(features=5, kernel_size=(1, 1),
          kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out',
                                                       'normal')), True),
    # Configurations oneDNN's path does not take: flax's.
    (dict(features=5, kernel_size=(3, 3), strides=2), False),
    (dict(features=6, kernel_size=(3, 3), feature_group_count=2), False),
    (dict(features=5, kernel_size=(3, 3), kernel_dilation=2), False),
    (dict(features=5, kernel_size=(3, 3), padding='CIRCULAR'), False),
    # bfloat16 computation: oneDNN's where the CPU has bfloat16
    # instructions (float32 parameters and inputs cast for the call).
    (dict(features=5, kernel_size=(3, 3), dtype=jnp.bfloat16),
     onednn.bfloat16_supported()),
    (dict(features=5, kernel_size=(3, 3), dtype=jnp.bfloat16,
          param_dtype=jnp.bfloat16), False),
])
def test_conv_is_flax_conv(kwargs, fast):
  bfloat16 = kwargs.get('dtype') == jnp.bfloat16
  _assert_same(layers.Conv(**kwargs), _x((2, 9, 8, 4)), fast=fast,
               tolerance=2e-2 if bfloat16 else 1e-4,
               flax_module=nn.Conv(**kwargs), of_scale=bfloat16)


@pytest.mark.parametrize('channels', [3, 16])
def test_bfloat16_conv_of_bfloat16_activations_is_flax_conv(channels):
  """A bfloat16 model's inner layers: bfloat16 in, bfloat16 out."""
  kwargs = dict(features=8, kernel_size=(3, 3), dtype=jnp.bfloat16)
  _assert_same(layers.Conv(**kwargs), _x((2, 9, 8, channels), jnp.bfloat16),
               fast=onednn.bfloat16_supported(), tolerance=2e-2,
               flax_module=nn.Conv(**kwargs), of_scale=True)


def test_conv_of_a_single_example_or_1d_is_flax_conv():
  _assert_same(layers.Conv(3, (3, 3)), _x((9, 8, 4)), fast=False,
               flax_module=nn.Conv(3, (3, 3)))
  _assert_same(layers.Conv(3, (3,)), _x((2, 9, 4)), fast=False,
               flax_module=nn.Conv(3, (3,)))


class _ConvRelu(nn.Module):
  """A convolution, then `layers.relu` (fusable) or, with `flax_layers`,
  flax's conv and relu."""
  kwargs: dict
  flax_layers: bool = False

  @nn.compact
  def __call__(self, x):
    if self.flax_layers:
      return nn.relu(nn.Conv(name='conv', **self.kwargs)(x))
    return layers.relu(layers.Conv(name='conv', **self.kwargs)(x))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_conv_and_relu_are_flax_conv_and_relu_in_one_onednn_pass(dtype):
  kwargs = dict(features=6, kernel_size=(3, 3), dtype=dtype)
  fast = dtype == jnp.float32 or onednn.bfloat16_supported()
  bfloat16 = dtype == jnp.bfloat16
  x = _x((2, 9, 8, 4), dtype)
  _assert_same(_ConvRelu(kwargs), x, fast=fast,
               tolerance=2e-2 if bfloat16 else 1e-4, of_scale=bfloat16,
               flax_module=_ConvRelu(kwargs, flax_layers=True))
  if fast and onednn.available():
    module = _ConvRelu(kwargs)
    _, hlo = _run(module, module.init(jax.random.PRNGKey(0), x), x, True)
    # The unfused convolution, which `relu` replaced, is not computed.
    assert hlo.count('jaxlab_onednn_convolution_forward_relu') == 1
    assert 'jaxlab_onednn_convolution_forward"' not in hlo


class _ConvReluPool(nn.Module):
  """A convolution, its ReLU and a max-pool: jaxlab's layers or flax's."""
  pool: tuple
  flax_layers: bool = False

  @nn.compact
  def __call__(self, x):
    conv, relu, max_pool = ((nn.Conv, nn.relu, nn.max_pool) if self.flax_layers
                            else (layers.Conv, layers.relu, layers.max_pool))
    y = relu(conv(6, (3, 3), name='conv')(x))
    return max_pool(y, *self.pool)


@pytest.mark.parametrize('pool', [
    ((2, 2), (2, 2), 'VALID'),  # scratch_cnn's, cnn2's, VGG16's.
    ((3, 3), (2, 2), ((1, 1), (1, 1)))])  # Overlapping windows.
def test_conv_relu_and_max_pool_are_flaxs_in_one_gradient(pool):
  """The pool's gradient masked where a window's maximum is 0, not the
  convolution's: flax's outputs and gradients. (In bfloat16, oneDNN's and
  XLA's convolutions round differently and some windows' maxima change
  places; test_ops.py checks the fused gradient there against the
  composition of the unfused operations.)"""
  x = _x((2, 11, 10, 4))
  _assert_same(_ConvReluPool(pool), x, fast=True, tolerance=1e-4,
               flax_module=_ConvReluPool(pool, flax_layers=True))
  if onednn.available():
    module = _ConvReluPool(pool)
    _, hlo = _run(module, module.init(jax.random.PRNGKey(0), x), x, True)
    # Neither the unfused convolution nor its ReLU alone is computed.
    assert hlo.count('jaxlab_onednn_convolution_forward_relu') == 1
    assert 'jaxlab_onednn_convolution_forward"' not in hlo
    assert hlo.count('jaxlab_onednn_max_pool_grad') == 1


@pytest.mark.parametrize('shape', [(3, 7), (2, 3, 7), (7,)])
@pytest.mark.parametrize('kwargs', [dict(features=5),
                                    dict(features=5, use_bias=False),
                                    dict(features=5, dtype=jnp.bfloat16),
                                    dict(features=5, dtype=jnp.bfloat16,
                                         use_bias=False)])
def test_dense_is_flax_dense(shape, kwargs):
  """float32 layers stay in XLA (`ops.dense`); bfloat16 ones run through
  oneDNN's matmul where the CPU has bfloat16 instructions, else flax's."""
  bfloat16 = kwargs.get('dtype') == jnp.bfloat16
  onednn_bf16 = bfloat16 and onednn.bfloat16_supported()
  _assert_same(layers.Dense(**kwargs), _x(shape), fast=onednn_bf16,
               tolerance=2e-2 if bfloat16 else 1e-5,
               flax_module=nn.Dense(**kwargs), fast_dense=not bfloat16,
               of_scale=bfloat16)


class _NormRelu(nn.Module):
  """BatchNorm, then `layers.relu` (fusable) or its result used twice."""
  train: bool
  fuse: bool = True
  kwargs: dict | None = None
  flax_layers: bool = False

  @nn.compact
  def __call__(self, x):
    norm = nn.BatchNorm if self.flax_layers else layers.BatchNorm
    y = norm(use_running_average=not self.train, momentum=0.9,
             name='bn', **(self.kwargs or {}))(x)
    if self.flax_layers:
      return nn.relu(y)
    if self.fuse:
      return layers.relu(y)
    return layers.relu(y) + y  # y is needed: both run.


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('fuse', [True, False])
def test_batch_norm_and_relu_are_flax_batch_norm_and_relu(train, fuse):
  x = _x((3, 7, 5, 6)) * 3 + 2
  train_kwargs = {'mutable': ['batch_stats']} if train else None
  _assert_same(_NormRelu(train, fuse), x, fast=train, tolerance=1e-4,
               train_kwargs=train_kwargs,
               flax_module=_NormRelu(train, flax_layers=True) if fuse else None)


@pytest.mark.parametrize('kwargs', [dict(use_scale=False), dict(axis=1),
                                    dict(use_fast_variance=False),
                                    dict(dtype=jnp.bfloat16)])
def test_batch_norm_options_the_fast_path_skips_are_flaxs(kwargs):
  tolerance = 5e-2 if kwargs.get('dtype') == jnp.bfloat16 else 1e-5
  _assert_same(_NormRelu(True, kwargs=kwargs), _x((3, 7, 5, 6)), fast=False,
               tolerance=tolerance, train_kwargs={'mutable': ['batch_stats']})


@pytest.mark.parametrize('fuse', [True, False])
def test_bfloat16_batch_norm_is_flaxs(fuse):
  """bfloat16 activations, float32 parameters and statistics: with the
  ReLU, oneDNN's where the CPU has bfloat16 instructions."""
  x = _x((3, 7, 5, 6), jnp.bfloat16) * 3 + 2
  kwargs = dict(dtype=jnp.bfloat16)
  _assert_same(_NormRelu(True, fuse, kwargs=kwargs), x,
               fast=onednn.bfloat16_supported(), tolerance=2e-2,
               train_kwargs={'mutable': ['batch_stats']}, of_scale=True,
               flax_module=(_NormRelu(True, kwargs=kwargs, flax_layers=True)
                            if fuse else None))


def test_fused_batch_norm_relu_runs_oneDNN_once_each_way():
  """The unfused normalisation, which `relu` replaced, costs nothing: only
  oneDNN's forward and gradient run, once each."""
  if not onednn.available():
    pytest.skip('oneDNN is not installed')
  x = _x((4, 6, 6, 8))
  module = _NormRelu(True)
  variables = module.init(jax.random.PRNGKey(0), x)
  _, hlo = _run(module, variables, x, True, {'mutable': ['batch_stats']})
  assert hlo.count('jaxlab_onednn_batch_norm_relu') == 2


@pytest.mark.parametrize('window,strides,padding,fast', [
    ((2, 2), (2, 2), 'VALID', True),
    ((3, 3), (2, 2), ((1, 1), (1, 1)), True),
    ((3, 3), None, 'SAME', True),  # flax's default stride is 1.
    ((3, 3), (2, 2), [[1, 1], [1, 1]], True),  # Lists, as flax reads them.
    ((3, 3), (2, 2), 'SAME', False),  # Uneven padding: flax's.
    ((2, 3), (2, 2), 'VALID', False),
])
def test_max_pool_is_flax_max_pool(window, strides, padding, fast):
  x = _x((2, 9, 8, 3))
  with platforms.tracing_cpu_program():
    jaxpr = str(jax.make_jaxpr(
        lambda v: layers.max_pool(v, window, strides, padding))(x))
  assert ('reduce_window_max' not in jaxpr) == fast
  ours = lambda cpu: jax.jit(
      lambda v: _traced(cpu, layers.max_pool, v, window, strides, padding))
  plain = jax.jit(lambda v: nn.max_pool(v, window, strides, padding))
  cotangent = np.asarray(_x(plain(x).shape))
  for f in (ours(True), ours(False)):
    out, vjp = jax.vjp(f, x)
    np.testing.assert_array_equal(out, plain(x))
    np.testing.assert_allclose(vjp(cotangent)[0],
                               jax.vjp(plain, x)[1](cotangent)[0],
                               rtol=1e-6, atol=1e-6)  # Overlaps sum apart.


def _traced(cpu, fn, *args):
  with platforms.tracing_cpu_program(cpu):
    return fn(*args)


def test_outside_the_cpu_program_every_layer_is_flaxs():
  x = _x((2, 8, 8, 3))
  model = nn.Sequential([layers.Conv(4, (3, 3)), layers.relu,
                         lambda v: layers.max_pool(v, (2, 2), (2, 2)),
                         layers.Dense(3)])
  variables = model.init(jax.random.PRNGKey(0), x)
  hlo = jax.jit(model.apply).lower(variables, x).as_text()
  assert _ONEDNN not in hlo and 'custom_call' not in hlo
