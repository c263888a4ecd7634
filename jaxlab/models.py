"""Flax linen models of the two reports, and a registry to build them by name.

Every model maps NHWC float images to logits (no softmax). Models with
BatchNorm keep their running statistics in the `batch_stats` collection;
`train=True` uses batch statistics (averaged over `axis_name` when the model
runs under `jax.pmap`) and updates the running ones.
"""

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import ops
from jaxlab.errors import UserError

ACTIVATIONS: dict[str, Callable] = {'relu': nn.relu, 'sigmoid': nn.sigmoid}


def _activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise UserError(f'config model.activation={name!r} is not known; '
                    f'choose one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


class Conv(nn.Module):
  """`nn.Conv` with stride 1 (same parameters, names, initialisers and
  results) whose kernel and bias gradients run faster on CPU (see
  `ops.conv2d`). Parameters are float32; `dtype` is the
  dtype of the computation."""
  features: int
  kernel_size: Sequence[int]
  padding: str | Sequence[tuple[int, int]] = 'SAME'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    padding = self.padding
    if isinstance(padding, str):
      padding = jax.lax.padtype_to_pads(x.shape[1:3], self.kernel_size,
                                        (1, 1), padding)
    return ops.conv2d(x.astype(self.dtype), kernel.astype(self.dtype),
                      tuple(tuple(pair) for pair in padding),
                      bias.astype(self.dtype))


class Dense(nn.Module):
  """`nn.Dense` (same parameters, names, initialisers and results) whose
  input gradient runs faster on CPU (see `ops.dense`). Parameters are
  float32; `dtype` is the dtype of the computation."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    y = ops.dense(x.reshape(-1, x.shape[-1]).astype(self.dtype),
                  kernel.astype(self.dtype), bias.astype(self.dtype))
    return y.reshape(*x.shape[:-1], self.features)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over all axes but the last, with flax's defaults (fast
  variance, scale and bias; same parameters, `batch_stats`, initialisers and
  results) whose batch statistics and gradients reduce faster on CPU (see
  `ops.batch_norm`). Parameters and statistics are float32; `dtype` is the
  dtype of the result. With `relu`, the result goes through a ReLU, computed
  with the normalisation (one oneDNN operation on CPU)."""
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: str | None = None
  relu: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features,
                            jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features,
                           jnp.float32)
    scale = self.param('scale', nn.initializers.ones_init(), features)
    bias = self.param('bias', nn.initializers.zeros_init(), features)
    if self.use_running_average:
      y = ops.normalize(x, ra_mean.value, ra_var.value, scale, bias,
                        self.epsilon)
      return (nn.relu(y) if self.relu else y).astype(self.dtype)
    # As flax's: no averaging over devices, and no update, when initialising.
    initializing = self.is_initializing()
    y, mean, var = ops.batch_norm(
        x, scale, bias, self.epsilon,
        None if initializing else self.axis_name, relu=self.relu)
    if not initializing:
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype)


def _flatten(x):
  return x.reshape((x.shape[0], -1))


def _valid_conv_blocks(x, channels: Sequence[int], convs_per_pool: int,
                       dtype):
  """Valid 3x3 convolutions `conv1`, `conv2`, ... with ReLU, and a 2x2
  max-pool after every `convs_per_pool` of them (inside a compact method)."""
  for i, features in enumerate(channels):
    x = nn.relu(Conv(features, (3, 3), padding='VALID', dtype=dtype,
                     name=f'conv{i + 1}')(x))
    if (i + 1) % convs_per_pool == 0:
      x = ops.max_pool(x, 2)
  return x


class FC(nn.Module):
  """Report A's fully connected net: flatten -> 512 -> 256 -> classes."""
  num_classes: int
  hidden: Sequence[int] = (512, 256)
  activation: str = 'relu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = _activation(self.activation)
    x = _flatten(x)
    for i, width in enumerate(self.hidden):
      x = act(Dense(width, dtype=self.dtype, name=f'dense{i + 1}')(x))
    return Dense(self.num_classes, dtype=self.dtype, name='head')(x)


class CNN1(nn.Module):
  """Report A's first CNN: two blocks of two 3x3 convolutions and a max-pool.

  Convolutions are 3x3, stride 1, padding 1; pools are 3x3, stride 2,
  padding 1. With `batch_norm=True` this is report A's `cnn_bn`: BatchNorm
  after every convolution, before its ReLU.
  """
  num_classes: int
  channels: Sequence[int] = (16, 16, 32, 32)
  hidden: int = 256
  batch_norm: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.channels) != 4:
      raise UserError(f'config model.channels={tuple(self.channels)} must '
                      'have 4 entries (two convolutions per block, 2 blocks)')
    for i, features in enumerate(self.channels):
      x = Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
               name=f'conv{i + 1}')(x)
      if self.batch_norm:
        # PyTorch's BatchNorm2d defaults: momentum 0.1 (0.9 here), eps 1e-5.
        x = BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, axis_name=self.axis_name, relu=True,
                      dtype=self.dtype, name=f'bn{i + 1}')(x)
      else:
        x = nn.relu(x)
      if i % 2 == 1:
        x = ops.max_pool(x, 3, stride=2, padding=1)
    x = nn.relu(Dense(self.hidden, dtype=self.dtype,
                      name='dense1')(_flatten(x)))
    return Dense(self.num_classes, dtype=self.dtype, name='head')(x)


class CNN2(nn.Module):
  """Report A's second CNN ("Net2_teach", Fig. 1), layer for layer.

  Valid 3x3 convolutions 32, 32, pool 2, 64, 64, pool 2, then Dense 256 and
  Dense classes with no activation between them, as in Fig. 1.
  """
  num_classes: int
  channels: Sequence[int] = (32, 32, 64, 64)
  hidden: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _valid_conv_blocks(x, self.channels, convs_per_pool=2,
                           dtype=self.dtype)
    x = Dense(self.hidden, dtype=self.dtype, name='dense1')(_flatten(x))
    return Dense(self.num_classes, dtype=self.dtype, name='head')(x)


class ScratchCNN(nn.Module):
  """Report B's CNN trained from scratch.

  Valid 3x3 convolutions of 16 channels, each followed by ReLU and a 2x2
  max-pool, optional dropout, then one Dense layer: at 224 x 224 the flatten
  has 54 * 54 * 16 = 46,656 features. Trains on logits (the report's code
  applied softmax twice).
  """
  num_classes: int
  channels: Sequence[int] = (16, 16)
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _valid_conv_blocks(x, self.channels, convs_per_pool=1,
                           dtype=self.dtype)
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return Dense(self.num_classes, dtype=self.dtype,
                 name='head')(_flatten(x))


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] averaging weights of PyTorch's AdaptiveAvgPool along one axis.

  Output cell i averages inputs floor(i * in / out) to
  ceil((i + 1) * in / out) - 1; the cells overlap when in < out.
  """
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -(-((i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, output_size: tuple[int, int]):
  """torchvision's `AdaptiveAvgPool2d` for NHWC inputs of any spatial size."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(output_size):
    return x
  rows = _adaptive_pool_matrix(h, output_size[0])
  cols = _adaptive_pool_matrix(w, output_size[1])
  return jnp.einsum('ih,jw,bhwc->bijc', rows.astype(x.dtype),
                    cols.astype(x.dtype), x)


class VGG16(nn.Module):
  """VGG16 in torchvision's layout, NHWC.

  Parameters are named by torchvision's module indices: `features.0` ...
  `features.28` (the 13 convolutions), `classifier.0`, `classifier.3` and
  `classifier.6` (the head, `num_classes` wide). `widths` (per block) and
  `classifier_width` default to VGG16's; smaller values give the same
  structure at a fraction of the cost.
  """
  num_classes: int
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  classifier_width: int = 4096
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  BLOCK_DEPTHS = (2, 2, 3, 3, 3)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.widths) != len(self.BLOCK_DEPTHS):
      raise UserError(f'config model.widths={tuple(self.widths)} must have '
                      f'{len(self.BLOCK_DEPTHS)} entries, one per VGG16 block')
    index = 0  # torchvision's index in `features`: conv, ReLU, ..., pool.
    for width, depth in zip(self.widths, self.BLOCK_DEPTHS):
      for _ in range(depth):
        x = nn.relu(Conv(width, (3, 3), padding=((1, 1), (1, 1)),
                         dtype=self.dtype, name=f'features.{index}')(x))
        index += 2
      x = ops.max_pool(x, 2)
      index += 1
    x = _flatten(adaptive_avg_pool(x, (7, 7)))
    for index in (0, 3):
      x = nn.relu(Dense(self.classifier_width, dtype=self.dtype,
                        name=f'classifier.{index}')(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train,
                     name=f'classifier.{index + 2}')(x)
    return Dense(self.num_classes, dtype=self.dtype,
                 name='classifier.6')(x)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  cls: type[nn.Module]
  defaults: dict


MODELS: dict[str, ModelSpec] = {
    'fc': ModelSpec(FC, {}),
    'cnn1': ModelSpec(CNN1, {}),
    'cnn2': ModelSpec(CNN2, {}),
    'cnn_bn': ModelSpec(CNN1, {'batch_norm': True}),
    'scratch_cnn': ModelSpec(ScratchCNN, {}),
    'vgg16': ModelSpec(VGG16, {}),
}

# Config keys under `model` that are not constructor arguments.
_NON_MODEL_KEYS = ('name', 'pretrained', 'download_pretrained')


def compute_dtype(half_precision: bool):
  """The dtype models compute in: bfloat16 for the config's
  `half_precision`, else float32."""
  return jnp.bfloat16 if half_precision else jnp.float32


def create_model(model_config, num_classes: int,
                 axis_name: str | None = None,
                 dtype: Any = jnp.float32) -> nn.Module:
  """Builds the model named by `model_config.name` with its other fields.

  Args:
    model_config: the config's `model` section; `name` picks the model and
      every other field (except `pretrained` and `download_pretrained`) is
      a constructor argument.
    num_classes: size of the output layer.
    axis_name: the `jax.pmap` axis over which BatchNorm averages statistics.
    dtype: the dtype of the computation (bfloat16 for `half_precision`);
      parameters and BatchNorm statistics stay float32.
  """
  name = model_config.name
  if name not in MODELS:
    raise UserError(f'config model.name={name!r} is not a model; choose one '
                    f'of {sorted(MODELS)}')
  spec = MODELS[name]
  fields = {f.name for f in dataclasses.fields(spec.cls)} - {'parent', 'name'}
  kwargs = dict(spec.defaults, num_classes=num_classes, dtype=dtype)
  for key, value in model_config.items():
    if key in _NON_MODEL_KEYS:
      continue
    if key not in fields:
      raise UserError(f'config model.{key} is not an option of model '
                      f'{name!r}; its options are {sorted(fields)}')
    kwargs[key] = tuple(value) if isinstance(value, list) else value
  if 'axis_name' in fields:
    kwargs['axis_name'] = axis_name
  return spec.cls(**kwargs)
