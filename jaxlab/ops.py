"""Layers whose default XLA lowering is slow on CPU, written to be fast.

`max_pool` (2 x 2 windows in cnn2, scratch_cnn and VGG16; 3 x 3, stride 2,
padding 1 in cnn1 and cnn_bn): flax's `nn.max_pool` differentiates through
XLA's `select_and_scatter`, which is slow on CPU. Here the gradient is a mask
computed elementwise over the windows (fusable), with the same semantics:
each window's gradient goes to its first maximum in row-major order, as
select_and_scatter (and PyTorch) route it.

`bias_add`: a bias whose gradient reduces in two stages (see
`_sum_to_channels`).
"""

import functools

import jax
import jax.numpy as jnp


def _strided_windows(x, k: int, stride: int, padding: int):
  """The k * k strided views [B, Ho, Wo, C] of x padded with -inf: view
  (i, j) holds each window's element at row i, column j (row-major)."""
  b, height, width, c = x.shape
  ho = (height + 2 * padding - k) // stride + 1
  wo = (width + 2 * padding - k) // stride + 1
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  xp = jnp.pad(x, pad, constant_values=-jnp.inf)
  views = []
  for i in range(k):
    for j in range(k):
      views.append(jax.lax.slice(
          xp, (0, i, j, 0),
          (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
          (1, stride, stride, 1)))
  return views, xp.shape


def max_pool(x, k: int = 2, stride: int | None = None, padding: int = 0):
  """Max over k x k windows of NHWC `x` with `stride` (default k) and
  `padding` (-inf), as `nn.max_pool(x, (k, k), (stride, stride),
  ((padding,) * 2,) * 2)`: rows and columns beyond the last whole window are
  dropped. Same gradient as flax's (each window's to its first maximum in
  row-major order), computed elementwise."""
  return _max_pool(x, k, k if stride is None else stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, k: int, stride: int, padding: int):
  views, _ = _strided_windows(x, k, stride, padding)
  return functools.reduce(jnp.maximum, views)


def _max_pool_fwd(x, k, stride, padding):
  out = _max_pool(x, k, stride, padding)
  return out, (x, out)


def _max_pool_bwd(k, stride, padding, saved, g):
  x, out = saved
  views, padded_shape = _strided_windows(x, k, stride, padding)
  taken = jnp.zeros(out.shape, bool)
  dx = jnp.zeros(padded_shape, g.dtype)
  zero = jnp.zeros((), g.dtype)
  for index, view in enumerate(views):
    i, j = divmod(index, k)
    first = (view == out) & ~taken
    taken = taken | first
    # Back to the view's positions in the padded input: stride - 1 zeros
    # between elements (interior padding), offset (i, j).
    rows = (i, padded_shape[1] - i - stride * (out.shape[1] - 1) - 1,
            stride - 1)
    cols = (j, padded_shape[2] - j - stride * (out.shape[2] - 1) - 1,
            stride - 1)
    dx = dx + jax.lax.pad(jnp.where(first, g, zero), zero,
                          ((0, 0, 0), rows, cols, (0, 0, 0)))
  height, width = x.shape[1:3]
  return (dx[:, padding:padding + height, padding:padding + width],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _sum_to_channels(g):
  """g [..., C] summed over all leading axes, in two stages.

  XLA:CPU reduces [N, C] with a small C over N column by column, several
  times slower than reducing rows of the wide [N / W, W * C] view first
  (bias gradient of cnn2's conv2: 64 ms against 14 ms).
  """
  channels = g.shape[-1]
  width = g.shape[-2] if g.ndim > 2 else 1
  rows = g.reshape(-1, width * channels).sum(axis=0)
  return rows.reshape(width, channels).sum(axis=0)


@jax.custom_vjp
def bias_add(x, bias):
  """x + bias over the last axis, with a fast bias gradient on CPU."""
  return x + bias


def _bias_add_fwd(x, bias):
  return x + bias, None


def _bias_add_bwd(_, g):
  return g, _sum_to_channels(g)


bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)
