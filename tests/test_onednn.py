"""oneDNN's convolutions and BatchNorm, called from XLA, give XLA's results;
the switch and the fallbacks choose the path they say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import onednn
from jaxlab import ops
from tests.conftest import outputs_and_grads

pytestmark = pytest.mark.skipif(
    not onednn.available(),
    reason='oneDNN (the onednn-cpu-gomp wheel) is not installed')

_TARGET = 'jaxlab_onednn_convolution'
_BATCH_NORM_TARGET = 'jaxlab_onednn_batch_norm_relu'


def _plain_conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _hlo(f, *args) -> str:
  return jax.jit(f).lower(*args).as_text()


@pytest.mark.parametrize('x_shape,kernel_shape,padding', [
    ((3, 9, 8, 3), (3, 3, 3, 4), ((1, 1), (1, 1))),  # An image's channels.
    ((2, 11, 10, 16), (3, 3, 16, 32), ((0, 0), (0, 0))),
    ((2, 7, 9, 5), (3, 3, 5, 6), ((1, 0), (0, 2))),  # Uneven padding.
    ((1, 6, 6, 8), (5, 5, 8, 3), ((2, 2), (2, 2))),
    ((2, 5, 4, 7), (1, 1, 7, 9), ((0, 0), (0, 0))),
    ((1, 4, 4, 64), (3, 3, 64, 64), ((1, 1), (1, 1))),  # VGG's widths.
])
def test_onednn_conv2d_matches_lax_convolution(x_shape, kernel_shape,
                                               padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=x_shape).astype(np.float32)
  kernel = rng.normal(size=kernel_shape).astype(np.float32)
  bias = rng.normal(size=kernel_shape[-1:]).astype(np.float32)
  cotangent = rng.normal(
      size=_plain_conv(x, kernel, padding).shape).astype(np.float32)
  ours = lambda v, k, b: ops.conv2d(v, k, padding, b)
  # The forward pass, x's gradient, and the kernel's and bias's together.
  assert _hlo(jax.value_and_grad(lambda *a: ours(*a).sum(), (0, 1, 2)), x,
              kernel, bias).count(_TARGET) == 3
  ours = outputs_and_grads(jax.jit(ours), cotangent, x, kernel, bias)
  plain = outputs_and_grads(
      jax.jit(lambda v, k, b: _plain_conv(v, k, padding) + b), cotangent, x,
      kernel, bias)
  for mine, theirs in zip(ours, plain):  # Output, x's, kernel's, bias's.
    # Summed in another order; an element sums up to 9 * 64 products.
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-4)


def test_onednn_conv_in_a_train_step_matches_xla(monkeypatch):
  """One SGD-style update through two convolutions, ReLU and a loss."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 12, 12, 3)).astype(np.float32)
  kernels = [rng.normal(size=s).astype(np.float32) * 0.3
             for s in ((3, 3, 3, 8), (3, 3, 8, 8))]
  pad = ((1, 1), (1, 1))

  def loss(kernels, x):
    y = jax.nn.relu(ops.conv2d(x, kernels[0], pad))
    return jnp.mean(ops.conv2d(y, kernels[1], pad) ** 2)

  grads = jax.jit(jax.grad(loss))(kernels, x)
  monkeypatch.setenv('JAXLAB_ONEDNN', '0')
  plain = jax.jit(jax.grad(loss))(kernels, x)
  for mine, theirs in zip(grads, plain):
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)


def test_switch_and_fallbacks(monkeypatch):
  x = jnp.ones((1, 6, 6, 4))
  kernel = jnp.ones((3, 3, 4, 2))
  # A new function each time: the switch is read when a function is traced.
  conv = lambda: lambda v, k: ops.conv2d(v, k, ((1, 1), (1, 1)))
  assert onednn.enabled() and _TARGET in _hlo(conv(), x, kernel)
  # bfloat16 computation (half_precision): oneDNN's where the CPU has
  # bfloat16 instructions, else XLA's.
  x16, kernel16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  assert (_TARGET in _hlo(conv(), x16, kernel16)) == (
      onednn.bfloat16_supported())
  with monkeypatch.context() as patch:
    patch.setattr(onednn, 'bfloat16_supported', lambda: False)
    assert _TARGET not in _hlo(conv(), x16, kernel16)
    assert 'jaxlab_onednn_dense' not in _hlo(
        lambda a, b: ops.dense(a, b, jnp.zeros(2, a.dtype)), x16[0, 0],
        kernel16[0, 0])
  # Negative padding (cropping) too.
  cropping = lambda v, k: ops.conv2d(v, k, ((-1, 0), (0, 1)))
  assert _TARGET not in _hlo(cropping, x, kernel)
  np.testing.assert_allclose(cropping(x, kernel),
                             _plain_conv(x, kernel, ((-1, 0), (0, 1))))
  monkeypatch.setenv('JAXLAB_ONEDNN', '0')
  assert not onednn.enabled() and _TARGET not in _hlo(conv(), x, kernel)


def test_vmap_runs_the_convolution_per_example():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 2, 7, 7, 4)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
  pad = ((1, 1), (1, 1))
  batched = jax.jit(jax.vmap(lambda v: ops.conv2d(v, kernel, pad)))(x)
  np.testing.assert_allclose(
      batched, np.stack([_plain_conv(v, kernel, pad) for v in x]),
      rtol=1e-5, atol=1e-4)


def test_bad_operand_is_a_clear_error_not_a_crash():
  x = jnp.ones((1, 6, 6, 4), jnp.float16)
  kernel = jnp.ones((3, 3, 4, 2), jnp.float16)
  with pytest.raises(Exception, match='float32 or bfloat16 throughout'):
    jax.block_until_ready(onednn.conv(x, kernel, jnp.ones(2, jnp.float16),
                                      ((1, 1), (1, 1))))


_BFLOAT16 = pytest.param('bfloat16', marks=pytest.mark.skipif(
    not onednn.bfloat16_supported(), reason='no bfloat16 instructions here'))


@pytest.mark.parametrize('dtype', ['float32', _BFLOAT16])
@pytest.mark.parametrize('kind', [*onednn.CONVOLUTION_KINDS,
                                  onednn.BATCH_NORM_RELU,
                                  onednn.BATCH_NORM_RELU_GRAD,
                                  *onednn.DENSE_KINDS,
                                  onednn.MAX_POOL, onednn.MAX_POOL_GRAD])
def test_onednn_picks_an_optimised_implementation(kind, dtype):
  """Not oneDNN's reference loops ('ref:...'), which are many times slower:
  that would mean the layouts asked for have no fast implementation, in
  float32 and (on CPUs with bfloat16 instructions) in bfloat16."""
  if kind in onednn.CONVOLUTION_KINDS:
    operation = onednn._convolution(kind, (2, 20, 20, 16), (3, 3, 16, 32),
                                    ((1, 1), (1, 1)), dtype)
  elif kind in onednn.DENSE_KINDS:
    operation = onednn._dense(kind, 8, 512, 100, dtype)
  elif kind in (onednn.MAX_POOL, onednn.MAX_POOL_GRAD):
    operation = onednn._max_pool_op(kind, (2, 20, 20, 16), 3, 2, 1, dtype)
  else:
    operation = onednn._batch_norm_relu(kind, (2, 20, 20, 16), dtype)
  implementation = operation.implementation()
  assert not implementation.startswith('ref'), implementation


def _batch_norm_relu_and_grads(x, scale, bias, cotangent):
  """(y, mean, var) of `ops.batch_norm` with its ReLU, and the gradients
  of sum(y * cotangent) with respect to x, scale and bias."""
  no_cotangent = np.zeros(x.shape[-1:], np.float32)  # The statistics'.
  outputs, *grads = outputs_and_grads(
      jax.jit(lambda *a: ops.batch_norm(*a, 1e-5, relu=True)),
      (cotangent, no_cotangent, no_cotangent), x, scale, bias)
  return (*outputs, *grads)


@pytest.mark.parametrize('shape', [
    (3, 7, 5, 6), (2, 11, 9, 16),
    (64, 6, 5, 32)])  # More rows than one thread's share.
def test_onednn_batch_norm_relu_matches_xla(shape, monkeypatch):
  rng = np.random.default_rng(4)
  x = rng.normal(1.5, 2, size=shape).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, shape[-1:]).astype(np.float32)
  bias = rng.normal(size=shape[-1:]).astype(np.float32)
  cotangent = rng.normal(size=shape).astype(np.float32)
  ours = lambda *a: ops.batch_norm(*a, 1e-5, relu=True)[0].sum()
  # Both operations, the forward pass and the gradient, are oneDNN's.
  hlo = _hlo(jax.grad(ours, (0, 1, 2)), x, scale, bias)
  assert hlo.count(_BATCH_NORM_TARGET) == 2
  mine = _batch_norm_relu_and_grads(x, scale, bias, cotangent)
  monkeypatch.setenv('JAXLAB_ONEDNN', '0')
  theirs = _batch_norm_relu_and_grads(x, scale, bias, cotangent)
  # y, mean, var; x's gradient (through the statistics), scale's and bias's
  # (sums over the batch, in another order).
  for name, a, b in zip(('y', 'mean', 'var', 'dx', 'dscale', 'dbias'), mine,
                        theirs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_onednn_batch_norm_relu_propagates_nan_as_xla(monkeypatch):
  """A NaN makes its channel's statistics NaN: its outputs and gradients are
  NaN, not zeroed by the ReLU (a diverged run must show)."""
  x = np.ones((2, 3, 3, 4), np.float32)
  x[0, 0, 0, 0] = np.nan
  bn = lambda v: ops.batch_norm(v, jnp.ones(4), jnp.zeros(4), 1e-5,
                                relu=True)[0]
  results = []
  for flag in ('1', '0'):
    monkeypatch.setenv('JAXLAB_ONEDNN', flag)
    results.append([np.isnan(jax.jit(f)(x)) for f in (
        bn, jax.grad(lambda v: bn(v).sum()))])
  for nan_at in results:
    for where in nan_at:  # y, dx: NaN in channel 0 only.
      assert where[..., 0].all() and not where[..., 1:].any()


def test_onednn_batch_norm_only_with_this_devices_statistics():
  """Statistics averaged over several devices keep XLA's gradient (oneDNN's
  sums over its own batch); over a single device oneDNN's runs."""
  x = jnp.ones((2, 3, 4, 5, 6))
  ours = jax.vmap(
      lambda v: ops.batch_norm(v, jnp.ones(6), jnp.zeros(6), 1e-5, 'devices',
                               relu=True)[0],
      axis_name='devices')
  assert _BATCH_NORM_TARGET not in _hlo(ours, x)
  assert _BATCH_NORM_TARGET in _hlo(ours, x[:1])
  # No ReLU to fuse, other ranks: XLA's.
  for args in ((x[0], False), (x[0, :, 0], True)):
    plain = lambda v, relu=args[1]: ops.batch_norm(
        v, jnp.ones(6), jnp.zeros(6), 1e-5, relu=relu)
    assert _BATCH_NORM_TARGET not in _hlo(plain, args[0])


def _bfloat16(rng, shape, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.bfloat16)


def _assert_bfloat16_close(mine, theirs, name):
  """bfloat16 results of oneDNN against XLA's from the same bfloat16
  operands: within a few bfloat16 roundings (2^-8) of the largest."""
  mine, theirs = (np.asarray(a, np.float32) for a in (mine, theirs))
  np.testing.assert_allclose(mine, theirs, rtol=2e-2,
                             atol=2e-2 * np.abs(theirs).max(), err_msg=name)


def _assert_bfloat16_matches_xla(make, cotangent, *args, monkeypatch):
  """`make()`'s jitted output and gradients (y, then one per argument), all
  bfloat16: through oneDNN, then with JAXLAB_ONEDNN=0 through XLA."""
  mine = outputs_and_grads(make(), cotangent, *args)
  monkeypatch.setenv('JAXLAB_ONEDNN', '0')
  theirs = outputs_and_grads(make(), cotangent, *args)
  for name, a, b in zip(('y', 'dx', 'dkernel', 'dbias'), mine, theirs):
    assert a.dtype == b.dtype == jnp.bfloat16, name
    _assert_bfloat16_close(a, b, name)


@pytest.mark.skipif(not onednn.bfloat16_supported(),
                    reason='no bfloat16 instructions here')
@pytest.mark.parametrize('x_shape,kernel_shape,padding', [
    ((3, 9, 8, 3), (3, 3, 3, 4), ((1, 1), (1, 1))),
    ((2, 7, 9, 16), (3, 3, 16, 32), ((1, 0), (0, 2))),
    ((1, 4, 4, 64), (3, 3, 64, 64), ((1, 1), (1, 1))),
])
def test_onednn_bfloat16_conv2d_matches_xla_bfloat16(x_shape, kernel_shape,
                                                      padding, monkeypatch):
  rng = np.random.default_rng(5)
  x, kernel = _bfloat16(rng, x_shape), _bfloat16(rng, kernel_shape, 0.3)
  bias = _bfloat16(rng, kernel_shape[-1:])
  cotangent = _bfloat16(rng, _plain_conv(x, kernel, padding).shape)
  conv = lambda: jax.jit(lambda v, k, b: ops.conv2d(v, k, padding, b))
  assert _hlo(conv(), x, kernel, bias).count(_TARGET) == 1
  _assert_bfloat16_matches_xla(conv, cotangent, x, kernel, bias,
                               monkeypatch=monkeypatch)


@pytest.mark.skipif(not onednn.bfloat16_supported(),
                    reason='no bfloat16 instructions here')
@pytest.mark.parametrize('batch,inputs,outputs', [(3, 7, 5), (16, 784, 100),
                                                  (2, 4096, 10)])
def test_onednn_bfloat16_dense_matches_xla_bfloat16(batch, inputs, outputs,
                                                    monkeypatch):
  rng = np.random.default_rng(6)
  x, kernel = _bfloat16(rng, (batch, inputs)), _bfloat16(
      rng, (inputs, outputs), inputs ** -0.5)
  bias, cotangent = _bfloat16(rng, (outputs,)), _bfloat16(rng,
                                                          (batch, outputs))
  dense = lambda: jax.jit(ops.dense)
  hlo = _hlo(jax.value_and_grad(
      lambda *a: dense()(*a).astype(jnp.float32).sum(), (0, 1, 2)), x,
              kernel, bias)
  assert hlo.count('jaxlab_onednn_dense') == 3  # Forward, dx, dkernel.
  _assert_bfloat16_matches_xla(dense, cotangent, x, kernel, bias,
                               monkeypatch=monkeypatch)


@pytest.mark.skipif(not onednn.bfloat16_supported(),
                    reason='no bfloat16 instructions here')
def test_onednn_bfloat16_batch_norm_relu_matches_xla(monkeypatch):
  """bfloat16 activations and their gradient; float32 statistics, scale and
  bias and their gradients."""
  rng = np.random.default_rng(7)
  shape = (8, 6, 5, 32)
  x = jnp.asarray(rng.normal(1.5, 2, size=shape), jnp.bfloat16)
  scale = rng.uniform(0.5, 1.5, shape[-1:]).astype(np.float32)
  bias = rng.normal(size=shape[-1:]).astype(np.float32)
  cotangent = _bfloat16(rng, shape)
  ours = lambda *a: ops.batch_norm(*a, 1e-5, relu=True)[0].astype(
      jnp.float32).sum()
  assert _hlo(jax.grad(ours, (0, 1, 2)), x, scale, bias).count(
      _BATCH_NORM_TARGET) == 2
  mine = _batch_norm_relu_and_grads(x, scale, bias, cotangent)
  monkeypatch.setenv('JAXLAB_ONEDNN', '0')
  theirs = _batch_norm_relu_and_grads(x, scale, bias, cotangent)
  dtypes = (jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16,
            jnp.float32, jnp.float32)
  for name, a, b, dtype in zip(('y', 'mean', 'var', 'dx', 'dscale', 'dbias'),
                               mine, theirs, dtypes):
    assert a.dtype == b.dtype == dtype, name
    _assert_bfloat16_close(a, b, name)


@pytest.mark.skipif(not onednn.bfloat16_supported(),
                    reason='no bfloat16 instructions here')
@pytest.mark.parametrize('shape,k,stride,padding', [
    ((4, 15, 14, 16), 2, 2, 0),  # scratch_cnn's, VGG16's: rows left out.
    ((4, 12, 11, 32), 3, 2, 1)])  # cnn_bn's: overlapping and padded.
@pytest.mark.parametrize('ties', [False, True])
def test_onednn_bfloat16_max_pool_matches_xla_bfloat16(shape, k, stride,
                                                       padding, ties,
                                                       monkeypatch):
  """Maxima exactly; gradients to the same (first) maximum of each window,
  summed where windows overlap within bfloat16 rounding."""
  rng = np.random.default_rng(8)
  x = _bfloat16(rng, shape)
  if ties:  # ReLU outputs: most windows hold several zeros.
    x = jnp.maximum(jnp.round(x), 0)
  pool = lambda: jax.jit(lambda v: ops.max_pool(v, k, stride, padding))
  cotangent = _bfloat16(rng, pool()(x).shape)
  assert _hlo(jax.grad(lambda v: pool()(v).astype(jnp.float32).sum()),
              x).count('jaxlab_onednn_max_pool') == 2
  mine = outputs_and_grads(pool(), cotangent, x)
  monkeypatch.setenv('JAXLAB_ONEDNN', '0')
  theirs = outputs_and_grads(pool(), cotangent, x)
  np.testing.assert_array_equal(mine[0], theirs[0])
  assert mine[1].dtype == theirs[1].dtype == jnp.bfloat16
  if stride >= k:
    np.testing.assert_array_equal(mine[1], theirs[1])
  else:
    _assert_bfloat16_close(mine[1], theirs[1], 'dx')


def test_max_pool_gradient_wants_the_workspace_of_its_shape():
  x = jnp.zeros((2, 8, 8, 4))
  _, workspace = onednn.max_pool(x, 2, 2, 0)
  with pytest.raises(ValueError, match=r'workspace of shape \(\d+,\), '
                                       r'expected \(\d+,\)'):
    onednn.max_pool_grad(workspace[1:], jnp.zeros((2, 4, 4, 4)), x.shape, 2,
                         2, 0)
