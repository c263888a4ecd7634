"""XLA:CPU implementations of layers whose default lowering is slow on CPU.

`jaxlab.layers` calls these when it traces the XLA:CPU program (see
`jaxlab.platforms`); GPUs and TPUs get flax's own layers. Each gives the
plain layer's outputs and gradients, to float rounding; what each saves is
measured in benchmarks/README.md.

`max_pool` (2 x 2 windows in cnn2, scratch_cnn and VGG16; 3 x 3, stride 2,
padding 1 in cnn1 and cnn_bn): flax's `nn.max_pool` differentiates through
XLA's `select_and_scatter`, which is slow on CPU. Here the forward pass keeps
each window's first maximum as a small index, and the gradient is computed
from it, with the same semantics: each window's gradient goes to its first
maximum in row-major order, as select_and_scatter (and PyTorch) route it.
In float32 (and bfloat16 on CPUs with bfloat16 instructions), oneDNN's
pooling does both, keeping the index in its workspace; otherwise XLA's
fusions do (elementwise).

`conv2d`: a stride-1 convolution and its bias. In float32 (and in bfloat16
on CPUs with bfloat16 instructions), through oneDNN (see `jaxlab.onednn`),
whose kernel gradient computes the bias's in the same pass; otherwise
through XLA, with a kernel gradient that transposes its input the fast way
(see `_conv_kernel_grad`), a forward pass on inputs of up to 4 channels
written as a fused sum of shifted products (see
`_forward_conv`), and a bias gradient that reduces in stages (see
`_channel_sums`).

`dense`: a fully connected layer whose input gradient computes the product
with its operands swapped, the order XLA:CPU runs fast (see
`_dense_input_grad`); in bfloat16, through oneDNN's matmul.

`batch_statistics` and `batch_normalize`: BatchNorm in training, whose
statistics and gradients reduce over the batch in stages, each pair of sums
in one pass (see `_channel_sums`); with the ReLU after it, normalisation and
gradient through oneDNN (see `_uses_onednn_batch_norm`).

`sum_of_squares`: for the gradient norm and its clipping, in one pass over
each parameter's gradient (see `_channel_sums`).
"""

import functools

import jax
import jax.numpy as jnp

from jaxlab import onednn


def _stored(unknown, branch, equivalent_branch, *operands):
  """branch(*operands) inside a conditional, whose operands and result XLA
  stores rather than fuses: each is computed once, not recomputed in every
  fusion that reads it.

  XLA keeps the conditional only if it cannot pick the branch at compile
  time: the predicate is `unknown`'s first element == itself (False only for
  a NaN), and the branches must differ; `equivalent_branch` has to give the
  same result (up to float rounding).
  """
  first = unknown[(0,) * unknown.ndim]
  return jax.lax.cond(first == first, branch, equivalent_branch, *operands)


def _strided_windows(x, k: int, stride: int, padding: int):
  """The k * k strided views [B, Ho, Wo, C] of x padded with -inf: view
  (i, j) holds each window's element at row i, column j (row-major)."""
  b, height, width, c = x.shape
  ho, wo = (onednn.pooled_size(n, k, stride, padding) for n in (height, width))
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  xp = jnp.pad(x, pad, constant_values=-jnp.inf)
  views = []
  for i in range(k):
    for j in range(k):
      views.append(jax.lax.slice(
          xp, (0, i, j, 0),
          (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
          (1, stride, stride, 1)))
  return views


def max_pool(x, k: int = 2, stride: int | None = None, padding: int = 0):
  """Max over k x k windows of NHWC `x` with `stride` (default k) and
  `padding` (-inf), as `nn.max_pool(x, (k, k), (stride, stride),
  ((padding,) * 2,) * 2)`: rows and columns beyond the last whole window are
  dropped. Same gradient as flax's (each window's to its first maximum in
  row-major order): oneDNN's pooling where it computes x's dtype, else
  computed elementwise."""
  stride = k if stride is None else stride
  if _onednn_computes_in(x.dtype):
    return _onednn_max_pool(x, k, stride, padding)
  return _max_pool(x, k, stride, padding)


def _pooled_with_nans(x, pooled, k: int, stride: int, padding: int):
  """`pooled`, oneDNN's max-pool of x, with XLA's NaNs.

  oneDNN's max skips NaNs (a window of them gives -FLT_MAX); XLA's, like
  flax's and PyTorch's, returns NaN for any window holding one, which is how
  a diverging run shows itself. Where x's sum is NaN (one read-only pass),
  the result is XLA's max-pool of x instead.
  """
  return jax.lax.cond(jnp.isnan(_sum(x)),
                      lambda: _max_pool(x, k, stride, padding),
                      lambda: pooled)


def _onednn_max_pool_and_workspace(x, k, stride, padding):
  y, workspace = onednn.max_pool(x, k, stride, padding)
  return _pooled_with_nans(x, y, k, stride, padding), workspace


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _onednn_max_pool(x, k: int, stride: int, padding: int):
  return _onednn_max_pool_and_workspace(x, k, stride, padding)[0]


def _onednn_max_pool_fwd(x, k, stride, padding):
  y, workspace = _onednn_max_pool_and_workspace(x, k, stride, padding)
  return y, (workspace, x.shape)


def _onednn_max_pool_bwd(k, stride, padding, saved, g):
  workspace, shape = saved
  return (onednn.max_pool_grad(workspace, g, shape, k, stride, padding),)


_onednn_max_pool.defvjp(_onednn_max_pool_fwd, _onednn_max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, k: int, stride: int, padding: int):
  views = _strided_windows(x, k, stride, padding)
  return functools.reduce(jnp.maximum, views)


def _max_pool_fwd(x, k, stride, padding):
  views = _strided_windows(x, k, stride, padding)
  out = functools.reduce(jnp.maximum, views)
  # Each window's first maximum, as its row-major index: the backward pass
  # needs only this and the incoming gradient, not x.
  index_dtype = jnp.int8 if k * k <= 127 else jnp.int32
  first = jnp.full(out.shape, k * k - 1, index_dtype)
  for index in reversed(range(k * k - 1)):
    first = jnp.where(views[index] == out, index_dtype(index), first)
  return out, (first, x.shape)


def _max_pool_bwd(k, stride, padding, saved, g):
  first, shape = saved
  # Stored, the window indices are computed once, not in the gradient's
  # fusion for each element (4x the work).
  return (_stored(g, functools.partial(_pool_grad, k, stride, padding, shape),
                  functools.partial(_pool_grad_by_window_element, k, stride,
                                    padding, shape),
                  first, g),)


def _pool_grad(k, stride, padding, shape, first, g):
  """x's gradient from each window's first-maximum index and g: each
  window's g goes to that element of x (summed where windows overlap).

  Position p of the padded x, as (q, r) with p = q * stride + r, is element
  d * stride + r of window q - d, for d < ceil(k / stride) per axis: dx is
  a sum of that many g's shifted by d, each where `first` picks the
  element, over [B, Q, stride, Q', stride, C]. With tiling windows (stride
  k) it is g broadcast to each window's first maximum. Cheaper than adding
  the k * k window elements' gradients at their strided positions.
  """
  b, height, width, c = shape
  ho, wo = first.shape[1:3]
  shifts = -(-k // stride)
  zero = jnp.zeros((), g.dtype)
  # Offsets within a window reach shifts * stride - 1: past 127, int8
  # (the index's type for small windows) would wrap.
  offsets = first.dtype if shifts * stride <= 127 else jnp.int32
  dx = zero
  for dh in range(shifts):
    for dw in range(shifts):
      # Each (r, r') element's index in window (q - dh, q' - dw); k * k, which
      # no window has, where it falls outside the window.
      ih = dh * stride + jax.lax.broadcasted_iota(
          offsets, (stride, 1, stride, 1), 0)
      iw = dw * stride + jax.lax.broadcasted_iota(
          offsets, (stride, 1, stride, 1), 2)
      index = jnp.where((ih < k) & (iw < k), ih * k + iw, k * k).astype(
          first.dtype)
      shift = ((0, 0), (dh, shifts - 1 - dh), (dw, shifts - 1 - dw), (0, 0))
      shifted_first = jnp.pad(first, shift, constant_values=-1)
      shifted_g = jnp.pad(g, shift)
      dx = dx + jnp.where(shifted_first[:, :, None, :, None, :] == index,
                          shifted_g[:, :, None, :, None, :], zero)
  rows, cols = (ho + shifts - 1) * stride, (wo + shifts - 1) * stride
  dx = dx.reshape(b, rows, cols, c)
  # Rows and columns no window reaches get no gradient.
  dx = jnp.pad(dx, ((0, 0), (0, max(0, height + 2 * padding - rows)),
                    (0, max(0, width + 2 * padding - cols)), (0, 0)))
  return dx[:, padding:padding + height, padding:padding + width]


def _pool_grad_by_window_element(k, stride, padding, shape, first, g):
  """`_pool_grad` (up to float rounding where windows overlap), as the sum
  over the k * k window elements of their gradients, each placed at its
  positions in the padded x."""
  b, height, width, c = shape
  ho, wo = first.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  padded = (height + 2 * padding, width + 2 * padding)
  dx = jnp.zeros((b,) + padded + (c,), g.dtype)
  for index in range(k * k):
    i, j = divmod(index, k)
    # Back to the window element's positions in the padded input: stride - 1
    # zeros between elements (interior padding), offset (i, j).
    rows = (i, padded[0] - i - stride * (ho - 1) - 1, stride - 1)
    cols = (j, padded[1] - j - stride * (wo - 1) - 1, stride - 1)
    dx = dx + jax.lax.pad(jnp.where(first == index, g, zero), zero,
                          ((0, 0, 0), rows, cols, (0, 0, 0)))
  return dx[:, padding:padding + height, padding:padding + width]


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# XLA:CPU rewrites a reduction over more than this many elements of an axis
# into a reduce-window tree, and stores the reduced operand first: a sum of
# a fused product (BatchNorm's statistics and gradients) then writes and
# reads the whole product once more. Reductions of tuples are not rewritten.
_TREE_REDUCTION_WINDOW = 32


def _sum_row_blocks(xs):
  """One stage of `_sum_rows`: the same-shaped xs [N, ...] summed over
  blocks of at most 32 rows (padded with zeros if N has no large enough
  divisor), in one reduction of the tuple, which XLA does not rewrite."""
  rows, rest = xs[0].shape[0], xs[0].shape[1:]
  block = min(rows, max(d for d in range(1, _TREE_REDUCTION_WINDOW + 1)
                        if rows % d == 0))
  if block < min(rows, _TREE_REDUCTION_WINDOW // 4):
    block = _TREE_REDUCTION_WINDOW
    pad = ((0, -rows % block),) + ((0, 0),) * len(rest)
    xs = tuple(jnp.pad(x, pad) for x in xs)
    rows = xs[0].shape[0]
  return jax.lax.reduce(
      tuple(x.reshape(rows // block, block, *rest) for x in xs),
      tuple(jnp.zeros((), x.dtype) for x in xs),
      lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))


def _sum_rows(xs):
  """Each of the same-shaped xs [N, ...] summed over N, in stages of at most
  32 rows (see `_sum_row_blocks`): each sums few numbers at a time, as a
  tree would, for precision. Only the first stage reads the whole xs."""
  # Stored: else XLA merges a single x's stages into one reduction that
  # streams over columns.
  xs = jax.lax.optimization_barrier(_sum_row_blocks(xs))
  while xs[0].shape[0] > 1:
    xs = _sum_row_blocks(xs)
  return tuple(x[0] for x in xs)


def _channel_sums(*xs):
  """[len(xs), C] float32: each of the same-shaped xs [..., C] summed over
  all axes but the last.

  The sums run over the rows of the [rows, W * C] views, then over W (see
  `_sum_rows`). The first stage makes one pass over the data, fused with
  whatever computes it, with no intermediate stored, where XLA:CPU would
  reduce the columns of a stored x * x through a reduce-window tree.
  """
  shape = xs[0].shape
  channels = shape[-1]
  width = shape[-2] if len(shape) > 2 else 1
  sums = _sum_rows(tuple(x.astype(jnp.float32).reshape(-1, width * channels)
                         for x in xs))
  sums = _sum_rows(tuple(s.reshape(width, channels) for s in sums))
  return jnp.stack(sums)


def _sum(x):
  """x's float32 sum in one pass (see `_channel_sums`): as `jnp.sum`,
  XLA:CPU stored x converted to float32 and reduced it through a
  reduce-window tree (cnn_bn's bfloat16 pool inputs: 17 ms a step)."""
  return jnp.sum(_channel_sums(x.reshape(-1, x.shape[-1]) if x.ndim
                               else x.reshape(1, 1)))


def sum_of_squares(x):
  """The float32 sum of x * x over all of x, in one pass (see
  `_channel_sums`), where XLA:CPU rewrites a dot product into a product
  stored in full and a reduce-window tree over it."""
  return _sum(x * x)


_CONV_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                      dimension_numbers=_CONV_DIMENSIONS)


# With this few input channels (images: 3 or 4), XLA:CPU's convolution runs
# several times slower than the same sum written out as shifted products.
_SHIFTED_PRODUCTS_MAX_CHANNELS = 4


def _conv_as_shifted_products(x, kernel):
  """The VALID convolution as the sum over taps (i, j) and input channels c
  of x[:, i:, j:, c] * kernel[i, j, c]: one loop, which XLA fuses. Sums in
  float32, as a convolution accumulates."""
  dtype = x.dtype
  x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
  kh, kw, cin, _ = kernel.shape
  b, height, width, _ = x.shape
  ho, wo = height - kh + 1, width - kw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      shifted = jax.lax.slice(x, (0, i, j, 0), (b, i + ho, j + wo, cin))
      for c in range(cin):
        term = shifted[..., c:c + 1] * kernel[i, j, c]
        out = term if out is None else out + term
  return out.astype(dtype)


def _onednn_computes_in(dtype) -> bool:
  """Whether oneDNN is on and runs this dtype fast here: float32, or
  bfloat16 on a CPU with bfloat16 instructions (elsewhere oneDNN emulates
  them, slower than XLA)."""
  return onednn.enabled() and (dtype == jnp.float32 or (
      dtype == jnp.bfloat16 and onednn.bfloat16_supported()))


def _uses_onednn(x, padding) -> bool:
  # Negative padding (cropping) is XLA's only.
  return _onednn_computes_in(x.dtype) and min(min(padding)) >= 0


def _forward_conv(x, kernel, padding):
  if x.shape[-1] > _SHIFTED_PRODUCTS_MAX_CHANNELS:
    return _conv(x, kernel, padding)
  # Stored: fused into its consumers instead, the sum would be recomputed by
  # each (a max-pool reads every element several times). The kernel decides
  # the predicate: a padded x's first element is a constant XLA sees.
  # lax.pad: negative padding crops, as in the convolution's own padding.
  xp = jax.lax.pad(x, jnp.zeros((), x.dtype),
                   ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding),
                    (0, 0, 0)))
  return _stored(kernel, _conv_as_shifted_products,
                 lambda v, k: _conv(v, k, ((0, 0), (0, 0))), xp, kernel)


def conv2d(x, kernel, padding: tuple[tuple[int, int], tuple[int, int]],
           bias=None):
  """Stride-1 convolution of NHWC `x` with an HWIO `kernel`, plus `bias`
  (over the output channels; none if None).

  `padding` is ((top, bottom), (left, right)). Outputs and gradients are
  `lax.conv_general_dilated`'s (plus the bias), to float rounding. Float32
  convolutions run through oneDNN where it is installed (see
  `jaxlab.onednn`); others through XLA, with a faster kernel gradient and,
  for inputs of up to 4 channels, a forward pass written as a sum of
  shifted products.
  """
  if bias is None:
    bias = jnp.zeros(kernel.shape[-1:], x.dtype)
  return _conv2d(x, kernel, bias, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv2d(x, kernel, bias, padding):
  if _uses_onednn(x, padding):
    return onednn.conv(x, kernel, bias, padding)
  return _forward_conv(x, kernel, padding) + bias


def _conv2d_fwd(x, kernel, bias, padding):
  return _conv2d(x, kernel, bias, padding), (x, kernel)


def _channels_first(x):
  """[N, H, W, C] -> [C, H, W, N], written as a transpose over three axes."""
  n, h, w, c = x.shape
  return jnp.transpose(x.reshape(n, h * w, c), (2, 1, 0)).reshape(c, h, w, n)


def _channels_first_4d(x):
  return jnp.transpose(x, (3, 1, 2, 0))


# Below this size (32 MiB of float32) a fused transpose is cheap and the
# conditional's own cost outweighs it (scratch_cnn's activations, at most
# 24 MiB, ran slower with it; cnn_bn's conv4 input is above it).
_STORED_TRANSPOSE_MIN_SIZE = 2**23


def _conv_kernel_grad(x, g, padding):
  """The kernel's gradient: a convolution of x (batch as features) with g.

  As in XLA's own gradient, x goes to [C, H, W, N] and g to [H, W, N, O].
  XLA fuses x's producer (bias and ReLU, BatchNorm) into x's transpose; such
  a fused transpose reads x with a stride and runs several times slower
  than the pure one. For large x, the transpose here runs through
  `_stored`, so it reads the stored activation instead of recomputing it.
  """
  if x.size >= _STORED_TRANSPOSE_MIN_SIZE:
    xt = _stored(g, _channels_first, _channels_first_4d, x)
  else:
    xt = _channels_first_4d(x)
  gt = jnp.transpose(g, (1, 2, 0, 3))
  grad = _conv(xt, gt, padding)  # [C, kh, kw, O]
  return jnp.transpose(grad, (1, 2, 0, 3))  # HWIO


def _conv2d_bwd(padding, saved, g):
  x, kernel = saved
  if _uses_onednn(x, padding):
    return (onednn.conv_input_grad(g, kernel, x.shape, padding),
            *onednn.conv_kernel_grad(x, g, kernel.shape, padding))
  _, x_vjp = jax.vjp(lambda x: _conv(x, kernel, padding), x)
  return (x_vjp(g)[0], _conv_kernel_grad(x, g, padding),
          _channel_sums(g)[0].astype(g.dtype))


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d_fuses_relu(x, padding) -> bool:
  """Whether `conv2d_relu` computes this convolution and ReLU in one pass."""
  return _uses_onednn(x, padding)


def conv2d_relu(x, kernel, padding, bias=None):
  """max(0, conv2d(x, kernel, padding, bias)) where `conv2d_fuses_relu`:
  oneDNN applies the ReLU as it writes the convolution's output, and the
  gradient masks by that output (XLA:CPU otherwise reads and writes the
  activation once more, in bfloat16 its slowest pass: scratch_cnn's first
  layer, 10 ms of a 100 ms step)."""
  if bias is None:
    bias = jnp.zeros(kernel.shape[-1:], x.dtype)
  return _conv2d_relu(x, kernel, bias, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv2d_relu(x, kernel, bias, padding):
  return jax.lax.cond(
      _all_finite(x, kernel, bias),
      lambda: onednn.conv(x, kernel, bias, padding, relu=True),
      lambda: _relu_with_nans(onednn.conv(x, kernel, bias, padding)))


def _all_finite(*arrays):
  """Whether the arrays' sums are finite (one read-only pass over each):
  False where any holds an inf or a NaN (or the sum overflows)."""
  return jnp.isfinite(sum(_sum(a) for a in arrays))


def _relu_with_nans(y):
  """max(0, y), NaN where y is NaN, as XLA's ReLU (and flax's): oneDNN's
  ReLU post-op gives 0 there, which would hide a diverging run. The
  operations fused with it take this path where their operands are not
  all finite (`_all_finite`), the only way a convolution gives NaN."""
  return jnp.maximum(y, jnp.zeros((), y.dtype))


def _conv2d_relu_fwd(x, kernel, bias, padding):
  y = _conv2d_relu(x, kernel, bias, padding)
  return y, (x, kernel, y)


def _conv2d_relu_bwd(padding, saved, g):
  x, kernel, y = saved
  return _conv2d_bwd(padding, (x, kernel), jnp.where(y > 0, g, 0).astype(
      g.dtype))


_conv2d_relu.defvjp(_conv2d_relu_fwd, _conv2d_relu_bwd)


def conv2d_relu_max_pool(x, kernel, padding, k: int, stride: int,
                         pool_padding: int, bias=None):
  """max_pool(conv2d_relu(x, kernel, padding, bias), k, stride,
  pool_padding) where `conv2d_fuses_relu`, with one gradient for the three.

  A window's gradient goes to its first maximum, which passed the ReLU
  exactly when the window's maximum is above 0: the gradient masks the
  pooled gradient (a quarter of the elements, or fewer) rather than the
  convolution's, and keeps neither the convolution's output nor its mask
  (in bfloat16, XLA:CPU's mask was the slowest pass left in scratch_cnn's
  step: 9 ms of 44 for its first layer).
  """
  if bias is None:
    bias = jnp.zeros(kernel.shape[-1:], x.dtype)
  return _conv2d_relu_max_pool(x, kernel, bias, padding, k, stride,
                               pool_padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv2d_relu_max_pool(x, kernel, bias, padding, k, stride, pool_padding):
  return _conv2d_relu_max_pool_fwd(x, kernel, bias, padding, k, stride,
                                   pool_padding)[0]


def _conv2d_relu_max_pool_fwd(x, kernel, bias, padding, k, stride,
                              pool_padding):
  pooled, workspace = jax.lax.cond(
      _all_finite(x, kernel, bias),
      lambda: tuple(onednn.max_pool(onednn.conv(
          x, kernel, bias, padding, relu=True), k, stride, pool_padding)),
      lambda: _onednn_max_pool_and_workspace(
          _relu_with_nans(onednn.conv(x, kernel, bias, padding)), k, stride,
          pool_padding))
  return pooled, (x, kernel, pooled, workspace)


def _conv2d_relu_max_pool_bwd(padding, k, stride, pool_padding, saved, g):
  x, kernel, pooled, workspace = saved
  g = jnp.where(pooled > 0, g, 0).astype(g.dtype)
  y_shape = onednn.conv_output_shape(x.shape, kernel.shape, padding)
  dy = onednn.max_pool_grad(workspace, g, y_shape, k, stride, pool_padding)
  return _conv2d_bwd(padding, (x, kernel), dy)


_conv2d_relu_max_pool.defvjp(_conv2d_relu_max_pool_fwd,
                             _conv2d_relu_max_pool_bwd)


def _uses_onednn_dense(x) -> bool:
  # XLA:CPU's bfloat16 dot runs at a fraction of oneDNN's (AVX512-BF16 or
  # AMX); in float32 XLA's is as fast.
  return x.dtype == jnp.bfloat16 and _onednn_computes_in(x.dtype)


@jax.custom_vjp
def dense(x, kernel, bias):
  """`x @ kernel + bias` for `x` of shape [batch, in], `kernel` [in, out]
  and `bias` [out]: `nn.Dense`'s result and gradients, to float rounding.
  In bfloat16 on a CPU with bfloat16 instructions, through oneDNN."""
  if _uses_onednn_dense(x):
    return onednn.dense(x, kernel, bias)
  return jax.lax.dot_general(x, kernel, (((1,), (0,)), ((), ()))) + bias


def _dense_fwd(x, kernel, bias):
  return dense(x, kernel, bias), (x, kernel)


def _dense_input_grad(g, kernel):
  """g @ kernel.T, [batch, in].

  XLA:CPU runs this product several times slower than kernel @ g.T, the
  same product with its operands swapped. The barrier stops XLA from
  folding the transpose back into the product; the transpose itself is
  batch x in.
  """
  swapped = jax.lax.dot_general(kernel, g, (((1,), (1,)), ((), ())))
  return jax.lax.optimization_barrier(swapped).T


def _dense_bwd(saved, g):
  x, kernel = saved
  if _uses_onednn_dense(x):
    return (onednn.dense_input_grad(g, kernel),
            onednn.dense_kernel_grad(x, g),
            _channel_sums(g)[0].astype(g.dtype))
  return (_dense_input_grad(g, kernel),
          jax.lax.dot_general(x, g, (((0,), (0,)), ((), ()))),
          jnp.sum(g, axis=0))


dense.defvjp(_dense_fwd, _dense_bwd)


def _batch_means(sums, count: int, axis_name: str | None):
  """Per-channel sums of `count` elements each -> means over the devices of
  `axis_name` too (one collective for all of them)."""
  means = sums / count
  return means if axis_name is None else jax.lax.pmean(means, axis_name)


def normalize(x, mean, var, scale, bias, epsilon: float):
  """(x - mean) / sqrt(var + epsilon) * scale + bias over x's last axis, in
  float32, computed as flax's BatchNorm computes it."""
  multiplier = jax.lax.rsqrt(var + epsilon) * scale
  return (x.astype(jnp.float32) - mean) * multiplier + bias


def batch_statistics(x, axis_name: str | None = None):
  """float32 (mean, var) of `x` over all axes but the last and the devices
  of `axis_name`, as flax's `nn.BatchNorm` computes them in training (var =
  E[x^2] - E[x]^2, clipped at 0), with no gradient: they are for
  `batch_normalize` and the running averages.

  XLA:CPU reduces over the batch, height and width axes through slow
  reduce-windows; here the sums run as `_channel_sums`.
  """
  # No gradient from the start: else autodiff traces the sums' tangents,
  # which their optimization barriers keep alive.
  x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
  mean, mean_of_squares = _batch_means(_channel_sums(x32, x32 * x32),
                                       x.size // x.shape[-1], axis_name)
  return mean, jnp.maximum(0.0, mean_of_squares - mean * mean)


def batch_normalize(x, mean, var, scale, bias, epsilon: float,
                    axis_name: str | None = None, relu: bool = False):
  """BatchNorm's training output from x's own statistics.

  `mean` and `var` must be `batch_statistics(x, axis_name)`. Returns y =
  (x - mean) / sqrt(var + epsilon) * scale + bias in x's dtype (with
  `relu`, max(0, that)). Its gradients are those of flax's BatchNorm: x's
  goes through the statistics (as if computed here from x), scale's and
  bias's are this device's sums; mean and var get none.
  """
  if relu and _uses_onednn_batch_norm(x, axis_name):
    return _onednn_batch_norm_relu(x, mean, var, scale, bias, epsilon)
  y = _batch_normalized(x, mean, var, scale, bias, epsilon, axis_name)
  return jax.nn.relu(y) if relu else y


def batch_norm(x, scale, bias, epsilon: float, axis_name: str | None = None,
               relu: bool = False):
  """BatchNorm of NHWC (or [..., C]) `x` with its own batch's statistics:
  (y, mean, var) of `batch_statistics` and `batch_normalize`."""
  mean, var = batch_statistics(x, axis_name)
  return (batch_normalize(x, mean, var, scale, bias, epsilon, axis_name,
                          relu), mean, var)


def _uses_onednn_batch_norm(x, axis_name) -> bool:
  """Whether `batch_normalize` with a ReLU runs through oneDNN: NHWC in
  float32 (or in bfloat16, on CPUs with bfloat16 instructions), with
  statistics of this device's batch alone.

  oneDNN normalises and ReLUs in one pass, and computes the gradient in two
  (x's, through the statistics, with scale's and bias's), where XLA's
  fusions make five. Its gradient sums over this device's batch only, so
  with the statistics averaged over several devices the gradient stays
  XLA's (`_batch_normalized`).
  """
  return (x.ndim == 4 and _onednn_computes_in(x.dtype) and
          (axis_name is None or jax.lax.axis_size(axis_name) == 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _onednn_batch_norm_relu(x, mean, var, scale, bias, epsilon):
  return _onednn_batch_norm_relu_fwd(x, mean, var, scale, bias, epsilon)[0]


def _onednn_batch_norm_relu_fwd(x, mean, var, scale, bias, epsilon):
  y, workspace = onednn.batch_norm_relu(x, mean, var + epsilon, scale, bias)
  return y, (x, mean, var, scale, workspace)


def _onednn_batch_norm_relu_bwd(epsilon, saved, g):
  x, mean, var, scale, workspace = saved
  dx, dscale, dbias = onednn.batch_norm_relu_grad(
      x, mean, var + epsilon, scale, workspace, g)
  return dx, None, None, dscale, dbias


_onednn_batch_norm_relu.defvjp(_onednn_batch_norm_relu_fwd,
                               _onednn_batch_norm_relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _batch_normalized(x, mean, var, scale, bias, epsilon, axis_name):
  del axis_name  # The statistics are given.
  return normalize(x, mean, var, scale, bias, epsilon).astype(x.dtype)


def _batch_normalized_fwd(x, mean, var, scale, bias, epsilon, axis_name):
  # Symbolic zeros: the primals come wrapped, with whether each is perturbed.
  x, mean, var, scale, bias = (a.value for a in (x, mean, var, scale, bias))
  del axis_name
  y = normalize(x, mean, var, scale, bias, epsilon).astype(x.dtype)
  return y, (x, mean, var, scale)


def _batch_normalized_bwd(epsilon, axis_name, saved, g):
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    # y is unused: `jaxlab.layers.relu` took the fused BatchNorm+ReLU
    # instead. Nothing to compute (instantiated zeros would cost a pass).
    return None, None, None, None, None
  x, mean, var, scale = saved
  g = g.astype(jnp.float32)
  inverse_std = jax.lax.rsqrt(var + epsilon)
  normalized = (x.astype(jnp.float32) - mean) * inverse_std
  # The parameters' gradients are this device's sums; x's goes through the
  # statistics of the whole batch, over all devices.
  sums = _channel_sums(g, g * normalized)
  bias_grad, scale_grad = sums
  mean_g, mean_g_normalized = _batch_means(sums, x.size // x.shape[-1],
                                           axis_name)
  x_grad = inverse_std * scale * (g - mean_g - normalized * mean_g_normalized)
  return x_grad.astype(x.dtype), None, None, scale_grad, bias_grad


_batch_normalized.defvjp(_batch_normalized_fwd, _batch_normalized_bwd,
                         symbolic_zeros=True)
