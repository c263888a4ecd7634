"""Layers whose default XLA lowering is slow on CPU, written to be fast.

`max_pool` (non-overlapping k x k windows, as in cnn2, scratch_cnn and
VGG16): flax's `nn.max_pool` differentiates through XLA's
`select_and_scatter`, which is slow on CPU. Here the gradient is a mask
computed elementwise over the windows (fusable), with the same semantics: each window's gradient goes to its first maximum in row-major
order, as select_and_scatter (and PyTorch) route it.
"""

import functools

import jax
import jax.numpy as jnp


def _blocks(x, k: int):
  """x [B, H, W, C] as [B, H/k, k, W/k, k, C] (a free reshape).

  Rows and columns beyond the last whole window are dropped (floor), as in
  PyTorch's MaxPool2d and a VALID max-pool.
  """
  b, height, width, c = x.shape
  h, w = height // k, width // k
  return x[:, :h * k, :w * k].reshape(b, h, k, w, k, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x, k: int = 2):
  """Max over non-overlapping k x k windows (stride k) of NHWC `x`."""
  return _blocks(x, k).max(axis=(2, 4))


def _max_pool_fwd(x, k):
  out = max_pool(x, k)
  return out, (x, out)


def _max_pool_bwd(k, saved, g):
  x, out = saved
  blocks = _blocks(x, k)
  is_max = blocks == out[:, :, None, :, None]
  # The first maximum in row-major window order: the one whose position
  # (i * k + j) is the smallest among the window's maxima.
  position = jnp.arange(k * k, dtype=jnp.int32).reshape(k, 1, k, 1)
  first_position = jnp.where(is_max, position, k * k).min(axis=(2, 4))
  first = is_max & (position == first_position[:, :, None, :, None])
  dx = jnp.where(first, g[:, :, None, :, None], jnp.zeros((), g.dtype))
  b, h, _, w, _, c = dx.shape
  dx = dx.reshape(b, h * k, w * k, c)
  pad = ((0, 0), (0, x.shape[1] - h * k), (0, x.shape[2] - w * k), (0, 0))
  return (jnp.pad(dx, pad),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


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
