"""The layers jaxlab's models are written with: flax's, with CPU fast paths.

`Conv`, `Dense` and `BatchNorm` are `nn.Conv`, `nn.Dense` and `nn.BatchNorm`
(subclasses with the same fields, parameters, names, initialisers and
semantics); `max_pool`, `avg_pool` and `relu` take the arguments of flax's
functions. A model written with them is a plain flax linen model:

    x = layers.Conv(64, (3, 3), strides=2, use_bias=False)(x)
    x = layers.relu(layers.BatchNorm(use_running_average=not train)(x))
    x = layers.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

Traced as the plain program (for GPUs and TPUs, or outside
`jaxlab.platforms.per_platform`), every layer is flax's own. Traced as the
XLA:CPU program, each takes jaxlab's CPU implementation (`jaxlab.ops`:
oneDNN's convolutions, BatchNorm and pooling, the swapped dense gradient)
where it covers the call - float32, 2-D convolutions of stride 1, square
pools - and flax's everywhere else, never an error. BatchNorm in
training followed by `relu` runs as one oneDNN operation: BatchNorm offers
the fusion, `relu` takes it; the model asks for nothing. The CPU
implementations define reverse-mode gradients (`jax.grad`, `jax.vjp`), as
training needs; forward-mode (`jax.jvp`, `jax.jacfwd`) works in the plain
program only.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import linear as flax_linear

from jaxlab import onednn
from jaxlab import ops
from jaxlab import platforms

avg_pool = nn.avg_pool  # XLA's own is fast enough on every backend.


def _is_float32(*dtypes) -> bool:
  return all(d is None or jnp.dtype(d) == jnp.float32 for d in dtypes)


def _cpu_dtypes(inputs_dtype, dtype, param_dtype) -> bool:
  """Whether the CPU program's layers take these dtypes: float32
  throughout, or bfloat16 computation (float32 parameters, cast for the
  call) on a CPU with bfloat16 instructions, which oneDNN runs."""
  if _is_float32(inputs_dtype, dtype, param_dtype):
    return True
  return (dtype is not None and jnp.dtype(dtype) == jnp.bfloat16 and
          _is_float32(param_dtype) and
          jnp.dtype(inputs_dtype) in (jnp.float32, jnp.bfloat16) and
          onednn.bfloat16_supported())


def _pairs(value, n: int) -> tuple:
  """flax's broadcast of an int (or None: 1) to n spatial dimensions."""
  if value is None:
    value = 1
  return (value,) * n if isinstance(value, int) else tuple(value)


def _explicit_padding(padding, spatial_shape, window, strides):
  """((lo, hi), (lo, hi)) for flax's padding forms over 2-D windows, or None
  for those (CIRCULAR, REFLECT, CAUSAL) the fast paths do not take."""
  padding = flax_linear.canonicalize_padding(padding, len(window))
  if isinstance(padding, str):
    if padding not in ('SAME', 'SAME_LOWER', 'VALID'):
      return None
    padding = jax.lax.padtype_to_pads(spatial_shape, window, strides, padding)
  return tuple(tuple(int(p) for p in pair) for pair in padding)


class Conv(nn.Conv):
  """`nn.Conv`. In the CPU program, 2-D float32 (and, where the CPU has
  bfloat16 instructions, bfloat16) convolutions of stride 1 with no
  dilation, groups or mask run as `ops.conv2d` (oneDNN), and offer `relu`
  their ReLU (`ops.conv2d_relu`), whose output offers `max_pool` its pool
  (`ops.conv2d_relu_max_pool`)."""

  @nn.compact
  def __call__(self, inputs):
    padding = self._cpu_padding(inputs)
    if padding is None:
      return super().__call__(inputs)
    kernel_size = _pairs(self.kernel_size, 1)
    kernel = self.param('kernel', self.kernel_init,
                        (*kernel_size, inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    inputs, kernel, bias = flax_linear.promote_dtype(inputs, kernel, bias,
                                                     dtype=self.dtype)
    y = ops.conv2d(inputs, kernel, padding, bias)
    if ops.conv2d_fuses_relu(inputs, padding):  # For `relu` to take.
      program = platforms.cpu_program()

      def conv_relu():
        relu_y = ops.conv2d_relu(inputs, kernel, padding, bias)
        # For `max_pool` to take.
        program.fusable_max_pool[id(relu_y)] = (
            relu_y, lambda k, stride, pool_padding: ops.conv2d_relu_max_pool(
                inputs, kernel, padding, k, stride, pool_padding, bias))
        return relu_y

      program.fusable_relu[id(y)] = (y, conv_relu)
    return y

  def _cpu_padding(self, inputs):
    """The explicit padding when `ops.conv2d` computes this call, else None."""
    if platforms.cpu_program() is None:
      return None
    kernel_size = _pairs(self.kernel_size, 1)
    plain = (inputs.ndim == 4 and len(kernel_size) == 2 and
             all(_pairs(v, 2) == (1, 1) for v in (
                 self.strides, self.input_dilation, self.kernel_dilation)) and
             self.feature_group_count == 1 and self.mask is None and
             self.precision is None and self.conv_general_dilated is None and
             self.conv_general_dilated_cls is None and
             self.promote_dtype is flax_linear.promote_dtype and
             _cpu_dtypes(inputs.dtype, self.dtype, self.param_dtype))
    if not plain:
      return None
    return _explicit_padding(self.padding, inputs.shape[1:3], kernel_size,
                             (1, 1))


class Dense(nn.Dense):
  """`nn.Dense`. In the CPU program, float32 layers run as `ops.dense`
  (whose input gradient XLA:CPU computes faster), and bfloat16 ones too
  (through oneDNN) where the CPU has bfloat16 instructions."""

  @nn.compact
  def __call__(self, inputs):
    if not self._cpu_covers(inputs):
      return super().__call__(inputs)
    kernel = self.param('kernel', self.kernel_init,
                        (inputs.shape[-1], self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias
            else None)
    inputs, kernel, bias = flax_linear.promote_dtype(inputs, kernel, bias,
                                                     dtype=self.dtype)
    if bias is None:
      bias = jnp.zeros((self.features,), inputs.dtype)
    y = ops.dense(inputs.reshape(-1, inputs.shape[-1]), kernel, bias)
    return y.reshape(*inputs.shape[:-1], self.features)

  def _cpu_covers(self, inputs) -> bool:
    return (platforms.cpu_program() is not None and
            self.precision is None and self.dot_general is None and
            self.dot_general_cls is None and
            self.promote_dtype is flax_linear.promote_dtype and
            _cpu_dtypes(inputs.dtype, self.dtype, self.param_dtype))


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm`. In the CPU program, training over the last axis with
  flax's defaults (fast variance, scale and bias), in float32 (or in
  bfloat16 with float32 parameters, on CPUs with bfloat16 instructions),
  reduces in stages (`ops.batch_statistics`); a `relu` on its result runs
  with it, as one oneDNN operation where that applies
  (`ops.batch_normalize`)."""

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask=None):
    running = nn.merge_param('use_running_average', self.use_running_average,
                             use_running_average)
    program = platforms.cpu_program()
    if running or program is None or not self._cpu_covers(x, mask):
      return super().__call__(x, use_running_average, mask=mask)
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var',
                           lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param('scale', self.scale_init, features, self.param_dtype)
    bias = self.param('bias', self.bias_init, features, self.param_dtype)
    # As flax's: no averaging over devices, and no update, when initialising.
    initializing = self.is_initializing()
    axis_name = None if initializing else self.axis_name
    mean, var = ops.batch_statistics(x, axis_name)
    normalize = lambda relu: ops.batch_normalize(
        x, mean, var, scale, bias, self.epsilon, axis_name, relu=relu)
    y = normalize(False)
    program.fusable_relu[id(y)] = (y, lambda: normalize(True))
    if not initializing:
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y

  def _cpu_covers(self, x, mask) -> bool:
    return (x.ndim >= 2 and self.axis in (-1, x.ndim - 1) and mask is None and
            self.axis_index_groups is None and self.use_fast_variance and
            self.use_scale and self.use_bias and
            self.force_float32_reductions and
            (_is_float32(x.dtype, self.dtype, self.param_dtype) or
             (x.dtype == self.dtype and
              _cpu_dtypes(x.dtype, self.dtype, self.param_dtype))))


def relu(x):
  """`nn.relu`. In the CPU program, the ReLU of a BatchNorm's training
  output is computed with that BatchNorm, and that of a convolution's output
  with that convolution (one oneDNN pass each)."""
  program = platforms.cpu_program()
  if program is not None:
    offered = program.fusable_relu.get(id(x))
    if offered is not None and offered[0] is x:
      return offered[1]()
  return nn.relu(x)


def max_pool(inputs, window_shape, strides=None, padding='VALID'):
  """`nn.max_pool`. In the CPU program, square 2-D windows with equal
  strides and symmetric padding run as `ops.max_pool` (oneDNN's, or one
  whose gradient is elementwise: XLA:CPU's select_and_scatter is slow);
  the max-pool of a convolution's ReLU runs with them
  (`ops.conv2d_relu_max_pool`)."""
  geometry = _square_pool(inputs, window_shape, strides, padding)
  if geometry is None:
    return nn.max_pool(inputs, window_shape, strides, padding)
  offered = platforms.cpu_program().fusable_max_pool.get(id(inputs))
  if offered is not None and offered[0] is inputs:
    return offered[1](*geometry)
  return ops.max_pool(inputs, *geometry)


def _square_pool(inputs, window_shape, strides, padding):
  """(k, stride, padding) of `ops.max_pool` for this call in the CPU
  program, else None."""
  window = tuple(window_shape)
  strides = tuple(strides) if strides is not None else (1,) * len(window)
  if (platforms.cpu_program() is None or inputs.ndim != 4 or
      len(window) != 2 or window[0] != window[1] or
      strides[0] != strides[1] or
      not jnp.issubdtype(inputs.dtype, jnp.floating)):
    return None
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      return None
    pads = jax.lax.padtype_to_pads(inputs.shape[1:3], window, strides,
                                   padding)
  else:  # As flax's pooling reads it: a pair per spatial dimension.
    try:
      pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    except (TypeError, ValueError):
      return None
  if len(pads) != 2 or len({p for pair in pads for p in pair}) != 1:
    return None
  return window[0], strides[0], pads[0][0]
