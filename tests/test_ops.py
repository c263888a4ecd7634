"""The CPU implementations give the plain operations' outputs and
gradients (see test_layers.py for the layers built on them)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import onednn
from jaxlab import ops
from tests.conftest import outputs_and_grads


@pytest.mark.parametrize('shape,k,stride,padding', [
    # Non-overlapping (cnn2, scratch_cnn, VGG16), with leftover rows/columns.
    ((2, 8, 8, 3), 2, 2, 0), ((2, 7, 9, 4), 2, 2, 0), ((1, 10, 11, 2), 3, 3, 0),
    ((1, 10, 11, 2), 2, 3, 0),  # Gaps between windows.
    # Overlapping and padded (cnn1, cnn_bn).
    ((2, 8, 8, 3), 3, 2, 1), ((2, 7, 9, 4), 3, 2, 1), ((1, 10, 11, 2), 3, 1, 1)])
@pytest.mark.parametrize('ties,nan_in_cotangent', [
    (False, False), (True, False),
    (False, True)])  # The gradient's other (equivalent) branch.
@pytest.mark.parametrize('through', ['onednn', 'xla'])
def test_max_pool_matches_flax(shape, k, stride, padding, ties,
                               nan_in_cotangent, through, monkeypatch):
  if through == 'onednn' and not onednn.enabled():
    pytest.skip('oneDNN (the onednn-cpu-gomp wheel) is not installed')
  if through == 'xla':
    monkeypatch.setenv('JAXLAB_ONEDNN', '0')
  hlo = jax.jit(jax.grad(lambda v: ops.max_pool(v, k, stride, padding).sum())
                ).lower(np.zeros(shape, np.float32)).as_text()
  assert hlo.count('jaxlab_onednn_max_pool') == (2 if through == 'onednn'
                                                 else 0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  if ties:  # Few distinct values: most windows hold several maxima.
    x = np.round(x).clip(0, 1)
  ours = jax.jit(lambda v: ops.max_pool(v, k, stride, padding))
  plain = jax.jit(lambda v: nn.max_pool(v, (k, k), strides=(stride, stride),
                                        padding=((padding, padding),) * 2))
  cotangent = rng.normal(size=plain(x).shape).astype(np.float32)
  if nan_in_cotangent:
    cotangent[0, 0, 0, 0] = np.nan
  ours, plain = (outputs_and_grads(f, cotangent, x) for f in (ours, plain))
  np.testing.assert_array_equal(ours[0], plain[0])
  if stride >= k:  # Each input in one window at most: exactly the same.
    np.testing.assert_array_equal(ours[1], plain[1])
  else:  # An input's contributions from several windows add in another
    # order (last-bit differences).
    np.testing.assert_allclose(ours[1], plain[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('shape', [
    (5, 3), (2, 6, 7, 4),
    (37, 3, 2),  # Prime row count: blocks of one row.
    (64, 40, 9, 5)])  # Blocks of 32 rows.
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_channel_sums_match_float64_sums(shape, dtype):
  rng = np.random.default_rng(2)
  xs = [rng.normal(size=shape).astype(np.float32) + 1 for _ in range(2)]
  sums = jax.jit(ops._channel_sums)(*(jnp.asarray(x, dtype) for x in xs))
  assert sums.dtype == jnp.float32
  exact = [np.asarray(jnp.asarray(x, dtype), np.float64) for x in xs]
  exact = np.stack([x.reshape(-1, shape[-1]).sum(0) for x in exact])
  np.testing.assert_allclose(sums, exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('sums', [lambda v: ops._channel_sums(v, v * v),
                                  ops.sum_of_squares])
def test_sums_store_no_full_size_intermediate(sums):
  # The sums of x (and of x * x) take one pass over x: XLA neither stores
  # x * x nor rewrites the reduction into a tree that reads a stored operand.
  x = jnp.ones((64, 32, 32, 16))
  hlo = jax.jit(sums).lower(x).compile().as_text()
  entry = [line for line in hlo[hlo.index('ENTRY'):].splitlines()
           if 'parameter(' not in line]
  sizes = [int(np.prod([int(d) for d in dims.split(',') if d]))
           for dims in re.findall(r'= \(?f32\[([\d,]*)\]', '\n'.join(entry))]
  assert max(sizes) < x.size // 8, sizes


@pytest.mark.parametrize('padding', [((0, 0), (0, 0)), ((1, 1), (1, 1)),
                                     ((1, 0), (0, 2))])
@pytest.mark.parametrize('channels', [3, 5])  # Shifted products up to 4.
@pytest.mark.parametrize('stored_transpose,nan_in', [
    (False, None), (True, None),
    # The conditionals' other (equivalent) branches.
    (True, 'cotangent'), (False, 'kernel')])
def test_xla_conv2d_matches_lax_convolution(padding, channels,
                                            stored_transpose, nan_in,
                                            monkeypatch):
  """The path without oneDNN (see test_onednn.py for the other)."""
  monkeypatch.setenv('JAXLAB_ONEDNN', '0')
  if stored_transpose:  # The path of large activations.
    monkeypatch.setattr(ops, '_STORED_TRANSPOSE_MIN_SIZE', 0)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 9, 8, channels)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, channels, 4)).astype(np.float32)
  bias = rng.normal(size=(4,)).astype(np.float32)
  plain = lambda v, k, b: jax.lax.conv_general_dilated(
      v, k, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b
  ours = lambda v, k, b: ops.conv2d(v, k, padding, b)
  cotangent = rng.normal(size=plain(x, kernel, bias).shape).astype(
      np.float32)
  if nan_in == 'cotangent':
    cotangent[0, 0, 0, 0] = np.nan
  if nan_in == 'kernel':
    kernel[0, 0, 0, 0] = np.nan
  ours, plain = (outputs_and_grads(jax.jit(f), cotangent, x, kernel, bias)
                 for f in (ours, plain))
  if channels <= ops._SHIFTED_PRODUCTS_MAX_CHANNELS and nan_in != 'kernel':
    # Summed in another order than XLA's convolution.
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-5, atol=1e-5)
  else:
    np.testing.assert_array_equal(ours[0], plain[0])
  np.testing.assert_array_equal(ours[1], plain[1])  # The input's gradient.
  for mine, theirs in zip(ours[2:], plain[2:]):  # The kernel's and bias's.
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)


def test_batch_norm_over_devices_is_batch_norm_of_the_whole_batch():
  # Four "devices" (a named vmap axis) with two examples each against one
  # batch of eight: statistics, outputs and gradients.
  rng = np.random.default_rng(3)
  x = rng.normal(2, 3, size=(4, 2, 5, 5, 3)).astype(np.float32)
  scale, bias = (rng.normal(size=3).astype(np.float32) for _ in range(2))
  weights = rng.normal(size=x.shape).astype(np.float32)

  def total(batch_norm):
    def f(x, scale, bias, weights):
      y, mean, var = batch_norm(x, scale, bias)
      return jnp.sum(jnp.sin(y) * weights), (y, mean, var)
    return jax.grad(f, (0, 1, 2), has_aux=True)

  sharded = jax.vmap(
      total(lambda *a: ops.batch_norm(*a, 1e-5, axis_name='devices')),
      in_axes=(0, None, None, 0), axis_name='devices')
  (dx, dscale, dbias), (y, mean, var) = sharded(x, scale, bias, weights)
  whole = x.reshape(8, 5, 5, 3)

  def plain(x, scale, bias):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    y = (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias
    return y, mean, var

  (dx1, dscale1, dbias1), (y1, mean1, var1) = total(plain)(
      whole, scale, bias, weights.reshape(whole.shape))
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
  close(y.reshape(y1.shape), y1)
  for device in range(4):  # Every device has the statistics of the whole.
    close(mean[device], mean1)
    close(var[device], var1)
  close(dx.reshape(dx1.shape), dx1)
  # Each device's parameter gradient is its own examples' share.
  close(dscale.sum(0), dscale1)
  close(dbias.sum(0), dbias1)


def test_batch_statistics_trace_no_tangents():
  """The statistics have no gradient: differentiating through them traces
  no tangent sums (their optimization barriers would keep those alive, and
  cnn_bn's compiled step had twice its fusions)."""
  x = jnp.ones((4, 5, 5, 3))
  primal = str(jax.make_jaxpr(ops.batch_statistics)(x))
  jvp = str(jax.make_jaxpr(
      lambda v, t: jax.jvp(ops.batch_statistics, (v,), (t,)))(x, x))
  assert primal.count('optimization_barrier') > 0
  assert jvp.count('optimization_barrier') == primal.count(
      'optimization_barrier')


def test_max_pool_gradient_with_a_stride_past_int8():
  # Window offsets reach stride - 1 = 129, past the int8 window index.
  x = np.random.default_rng(5).normal(size=(1, 260, 3, 1)).astype(np.float32)
  ours = lambda v: ops.max_pool(v, 2, 130, 0)
  plain = lambda v: nn.max_pool(v, (2, 2), strides=(130, 130))
  cotangent = np.ones(plain(x).shape, np.float32)
  np.testing.assert_array_equal(jax.vjp(ours, x)[1](cotangent)[0],
                                jax.vjp(plain, x)[1](cotangent)[0])


@pytest.mark.skipif(not onednn.enabled(),
                    reason='oneDNN (the onednn-cpu-gomp wheel) is not installed')
@pytest.mark.parametrize('k,stride,padding', [(2, 2, 0), (3, 2, 1)])
@pytest.mark.parametrize('dtype', [
    jnp.float32,
    pytest.param(jnp.bfloat16, marks=pytest.mark.skipif(
        not onednn.bfloat16_supported(), reason='no bfloat16 instructions'))])
def test_conv2d_relu_max_pool_is_the_unfused_composition(k, stride, padding,
                                                         dtype):
  """The same output and gradients, bit for bit, as max_pool(conv2d_relu),
  whose gradient masks the convolution's: windows whose maximum is 0 (all
  below 0 before the ReLU) pass no gradient either way."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 11, 10, 4)), dtype)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 6)) * 0.3, dtype)
  bias = jnp.asarray(rng.normal(-1.2, 0.3, size=(6,)), dtype)
  conv_padding = ((1, 0), (0, 1))
  fused = lambda *a: ops.conv2d_relu_max_pool(
      a[0], a[1], conv_padding, k, stride, padding, a[2])
  unfused = lambda *a: ops.max_pool(
      ops.conv2d_relu(a[0], a[1], conv_padding, a[2]), k, stride, padding)
  pooled = jax.jit(fused)(x, kernel, bias)
  assert 0.1 < float(jnp.mean(pooled == 0)) < 0.9
  cotangent = rng.normal(size=pooled.shape).astype(np.float32)
  ours, theirs = (outputs_and_grads(jax.jit(f), jnp.asarray(cotangent, dtype),
                                    x, kernel, bias) for f in (fused, unfused))
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.parametrize('through', ['onednn', 'xla', 'fused'])
@pytest.mark.parametrize('k,stride,padding', [(2, 2, 0), (3, 2, 1)])
def test_max_pool_of_nans_is_nan_as_flaxs(through, k, stride, padding,
                                          monkeypatch):
  """A window holding a NaN pools to NaN (oneDNN's own max skips it, and
  its ReLU post-op makes it 0), a window of NaNs too: a diverging run shows
  in its loss."""
  if through != 'xla' and not onednn.enabled():
    pytest.skip('oneDNN (the onednn-cpu-gomp wheel) is not installed')
  if through == 'xla':
    monkeypatch.setenv('JAXLAB_ONEDNN', '0')
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 9, 8, 3)).astype(np.float32)
  x[0, 1, 1, 0] = np.nan
  x[1, :4, :4, :] = np.nan
  if through == 'fused':  # A convolution, its ReLU and the pool.
    kernel = rng.normal(size=(1, 1, 3, 3)).astype(np.float32)
    ours = lambda v: ops.conv2d_relu_max_pool(v, kernel, ((0, 0), (0, 0)), k,
                                              stride, padding)
    x_pooled = jax.nn.relu(jax.lax.conv_general_dilated(
        x, kernel, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO',
                                                       'NHWC')))
  else:
    ours = lambda v: ops.max_pool(v, k, stride, padding)
    x_pooled = x
  plain = nn.max_pool(jnp.asarray(x_pooled), (k, k), strides=(stride, stride),
                      padding=((padding, padding),) * 2)
  assert np.isnan(plain).any()
  np.testing.assert_allclose(jax.jit(ours)(x), plain, rtol=1e-6)


@pytest.mark.skipif(not onednn.enabled(),
                    reason='oneDNN (the onednn-cpu-gomp wheel) is not installed')
def test_conv2d_relu_of_nans_is_nan_as_xlas_relu():
  """oneDNN's ReLU post-op makes NaN 0; XLA's ReLU keeps it."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
  x[0, 2, 2, 1] = np.nan
  kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  padding = ((1, 1), (1, 1))
  plain = jax.nn.relu(jax.lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  assert np.isnan(plain).any()
  np.testing.assert_allclose(
      jax.jit(lambda v: ops.conv2d_relu(v, kernel, padding))(x), plain,
      rtol=1e-5, atol=1e-5)
