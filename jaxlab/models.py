"""Flax linen models of the two reports, ResNets, and a registry by name.

Every model maps NHWC float images to logits (no softmax) and is written
with `jaxlab.layers` (flax's layers, with CPU fast paths chosen when the
program is lowered for CPU). Models with BatchNorm keep their running
statistics in the `batch_stats` collection; `train=True` uses batch
statistics (averaged over `axis_name` when the model runs under `jax.pmap`)
and updates the running ones.
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import layers
from jaxlab import onednn
from jaxlab.errors import UserError

ACTIVATIONS: dict[str, Callable] = {'relu': layers.relu, 'sigmoid': nn.sigmoid}


def _activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise UserError(f'config model.activation={name!r} is not known; '
                    f'choose one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def _flatten(x):
  return x.reshape((x.shape[0], -1))


def _max_pool_2x2(x):
  return layers.max_pool(x, (2, 2), strides=(2, 2))


# torchvision's initialisation of ResNet convolutions (kaiming_normal_,
# fan_out, ReLU gain).
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _batch_norm(train: bool, axis_name, dtype, name: str):
  """BatchNorm with PyTorch's BatchNorm2d defaults: momentum 0.1 (0.9 in
  flax's convention) and epsilon 1e-5."""
  return layers.BatchNorm(use_running_average=not train, momentum=0.9,
                          epsilon=1e-5, axis_name=axis_name, dtype=dtype,
                          name=name)


def _valid_conv_blocks(x, channels: Sequence[int], convs_per_pool: int,
                       dtype):
  """Valid 3x3 convolutions `conv1`, `conv2`, ... with ReLU, and a 2x2
  max-pool after every `convs_per_pool` of them (inside a compact method)."""
  for i, features in enumerate(channels):
    x = layers.relu(layers.Conv(features, (3, 3), padding='VALID',
                                dtype=dtype, name=f'conv{i + 1}')(x))
    if (i + 1) % convs_per_pool == 0:
      x = _max_pool_2x2(x)
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
      x = act(layers.Dense(width, dtype=self.dtype, name=f'dense{i + 1}')(x))
    return layers.Dense(self.num_classes, dtype=self.dtype, name='head')(x)


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
      x = layers.Conv(features, (3, 3), padding=((1, 1), (1, 1)),
                      dtype=self.dtype, name=f'conv{i + 1}')(x)
      if self.batch_norm:
        x = _batch_norm(train, self.axis_name, self.dtype,
                        name=f'bn{i + 1}')(x)
      x = layers.relu(x)
      if i % 2 == 1:
        x = layers.max_pool(x, (3, 3), strides=(2, 2),
                            padding=((1, 1), (1, 1)))
    x = layers.relu(layers.Dense(self.hidden, dtype=self.dtype,
                                 name='dense1')(_flatten(x)))
    return layers.Dense(self.num_classes, dtype=self.dtype, name='head')(x)


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
    x = layers.Dense(self.hidden, dtype=self.dtype,
                     name='dense1')(_flatten(x))
    return layers.Dense(self.num_classes, dtype=self.dtype, name='head')(x)


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
    return layers.Dense(self.num_classes, dtype=self.dtype,
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
        x = layers.relu(layers.Conv(width, (3, 3), padding=((1, 1), (1, 1)),
                                    dtype=self.dtype,
                                    name=f'features.{index}')(x))
        index += 2
      x = _max_pool_2x2(x)
      index += 1
    x = _flatten(adaptive_avg_pool(x, (7, 7)))
    for index in (0, 3):
      x = layers.relu(layers.Dense(self.classifier_width, dtype=self.dtype,
                                   name=f'classifier.{index}')(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train,
                     name=f'classifier.{index + 2}')(x)
    return layers.Dense(self.num_classes, dtype=self.dtype,
                        name='classifier.6')(x)


class _ResidualBlock(nn.Module):
  """A torchvision ResNet block: `convs` (features, kernel, stride) each
  with BatchNorm (`conv1`/`bn1`, ...), ReLU between them, the shortcut
  (`downsample.0` convolution and `downsample.1` BatchNorm where the shape
  changes) added before the last ReLU."""
  convs: Sequence[tuple[int, int, int]]
  downsample: bool
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(layers.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_KAIMING_FAN_OUT)
    norm = functools.partial(_batch_norm, train, self.axis_name, self.dtype)
    y = x
    for i, (features, kernel, stride) in enumerate(self.convs):
      pad = kernel // 2
      y = conv(features, (kernel, kernel), strides=stride,
               padding=((pad, pad), (pad, pad)), name=f'conv{i + 1}')(y)
      y = norm(name=f'bn{i + 1}')(y)
      if i + 1 < len(self.convs):
        y = layers.relu(y)
    shortcut = x
    if self.downsample:
      stride = max(s for _, _, s in self.convs)
      shortcut = conv(self.convs[-1][0], (1, 1), strides=stride,
                      padding='VALID', name='downsample.0')(x)
      shortcut = norm(name='downsample.1')(shortcut)
    return layers.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet in torchvision's layout (v1.5: a bottleneck's stride is on its
  3 x 3 convolution), NHWC.

  Parameters are named by torchvision's modules: `conv1`, `bn1`,
  `layer1.0.conv1`, `layer1.0.bn1`, ..., `layer2.0.downsample.0` (the
  shortcut's convolution) and `.1` (its BatchNorm), `fc` (the head,
  `num_classes` wide). Convolutions have no bias and torchvision's
  initialisation; BatchNorm has PyTorch's momentum and epsilon.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  widths: Sequence[int] = (64, 128, 256, 512)
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.widths) != len(self.stage_sizes):
      raise UserError(f'config model.widths={tuple(self.widths)} must have '
                      f'{len(self.stage_sizes)} entries, one per stage')
    x = layers.Conv(self.widths[0], (7, 7), strides=2,
                    padding=((3, 3), (3, 3)), use_bias=False,
                    dtype=self.dtype, kernel_init=_KAIMING_FAN_OUT,
                    name='conv1')(x)
    x = layers.relu(_batch_norm(train, self.axis_name, self.dtype, 'bn1')(x))
    x = layers.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    expansion = 4 if self.bottleneck else 1
    features = self.widths[0]
    for stage, (depth, width) in enumerate(zip(self.stage_sizes,
                                               self.widths)):
      for block in range(depth):
        stride = 2 if stage > 0 and block == 0 else 1
        if self.bottleneck:
          convs = ((width, 1, 1), (width, 3, stride),
                   (width * expansion, 1, 1))
        else:
          convs = ((width, 3, stride), (width, 3, 1))
        x = _ResidualBlock(
            convs, downsample=stride != 1 or features != width * expansion,
            axis_name=self.axis_name, dtype=self.dtype,
            name=f'layer{stage + 1}.{block}')(x, train)
        features = width * expansion
    x = jnp.mean(x, axis=(1, 2))  # torchvision's AdaptiveAvgPool2d((1, 1)).
    return layers.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


class ResNet18(ResNet):
  """ResNet-18: basic blocks, 2 per stage (11,689,512 parameters at 1000
  classes)."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False


class ResNet50(ResNet):
  """ResNet-50: bottleneck blocks, 3, 4, 6 and 3 per stage (25,557,032
  parameters at 1000 classes)."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  bottleneck: bool = True


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
    'resnet18': ModelSpec(ResNet18, {}),
    'resnet50': ModelSpec(ResNet50, {}),
}

# Config keys under `model` that are not constructor arguments.
_NON_MODEL_KEYS = ('name', 'pretrained', 'download_pretrained')


def compute_dtype(half_precision: bool):
  """The dtype models compute in: bfloat16 for the config's
  `half_precision`, else float32.

  On a CPU without bfloat16 instructions (neither AVX512-BF16 nor
  AMX-BF16), bfloat16 runs slower than float32: there it is float32, and
  says so once.
  """
  if not half_precision:
    return jnp.float32
  if jax.default_backend() == 'cpu' and not onednn.bfloat16_supported():
    _warn_no_bfloat16()
    return jnp.float32
  return jnp.bfloat16


@functools.cache
def _warn_no_bfloat16() -> None:
  isa = onednn.cpu_isa() if onednn.available() else 'unknown (no oneDNN)'
  logging.warning(
      'half_precision: this CPU has no bfloat16 instructions (AVX512-BF16 or '
      'AMX-BF16; instruction set %s), where bfloat16 runs slower than '
      'float32: computing in float32', isa)


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
