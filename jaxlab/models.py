"""Flax linen models of the two reports, and a registry to build them by name.

Every model maps NHWC float images to logits (no softmax). Models with
BatchNorm keep their running statistics in the `batch_stats` collection;
`train=True` uses batch statistics (averaged over `axis_name` when the model
runs under `jax.pmap`) and updates the running ones.
"""

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn

from jaxlab.errors import UserError

ACTIVATIONS: dict[str, Callable] = {'relu': nn.relu, 'sigmoid': nn.sigmoid}


def _activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise UserError(f'config model.activation={name!r} is not known; '
                    f'choose one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def _flatten(x):
  return x.reshape((x.shape[0], -1))


class FC(nn.Module):
  """Report A's fully connected net: flatten -> 512 -> 256 -> classes."""
  num_classes: int
  hidden: Sequence[int] = (512, 256)
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = _activation(self.activation)
    x = _flatten(x)
    for i, width in enumerate(self.hidden):
      x = act(nn.Dense(width, name=f'dense{i + 1}')(x))
    return nn.Dense(self.num_classes, name='head')(x)


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

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.channels) != 4:
      raise UserError(f'config model.channels={tuple(self.channels)} must '
                      'have 4 entries (two convolutions per block, 2 blocks)')
    for i, features in enumerate(self.channels):
      x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)),
                  name=f'conv{i + 1}')(x)
      if self.batch_norm:
        # PyTorch's BatchNorm2d defaults: momentum 0.1 (0.9 here), eps 1e-5.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         epsilon=1e-5, axis_name=self.axis_name,
                         name=f'bn{i + 1}')(x)
      x = nn.relu(x)
      if i % 2 == 1:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = nn.relu(nn.Dense(self.hidden, name='dense1')(_flatten(x)))
    return nn.Dense(self.num_classes, name='head')(x)


class CNN2(nn.Module):
  """Report A's second CNN ("Net2_teach", Fig. 1), layer for layer.

  Valid 3x3 convolutions 32, 32, pool 2, 64, 64, pool 2, then Dense 256 and
  Dense classes with no activation between them, as in Fig. 1.
  """
  num_classes: int
  channels: Sequence[int] = (32, 32, 64, 64)
  hidden: int = 256

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, features in enumerate(self.channels):
      x = nn.relu(nn.Conv(features, (3, 3), padding='VALID',
                          name=f'conv{i + 1}')(x))
      if i % 2 == 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dense(self.hidden, name='dense1')(_flatten(x))
    return nn.Dense(self.num_classes, name='head')(x)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  cls: type[nn.Module]
  defaults: dict


MODELS: dict[str, ModelSpec] = {
    'fc': ModelSpec(FC, {}),
    'cnn1': ModelSpec(CNN1, {}),
    'cnn2': ModelSpec(CNN2, {}),
    'cnn_bn': ModelSpec(CNN1, {'batch_norm': True}),
}

# Config keys under `model` that are not constructor arguments.
_NON_MODEL_KEYS = ('name', 'pretrained')


def create_model(model_config, num_classes: int,
                 axis_name: str | None = None) -> nn.Module:
  """Builds the model named by `model_config.name` with its other fields.

  Args:
    model_config: the config's `model` section; `name` picks the model and
      every other field (except `pretrained`) is a constructor argument.
    num_classes: size of the output layer.
    axis_name: the `jax.pmap` axis over which BatchNorm averages statistics.
  """
  name = model_config.name
  if name not in MODELS:
    raise UserError(f'config model.name={name!r} is not a model; choose one '
                    f'of {sorted(MODELS)}')
  spec = MODELS[name]
  fields = {f.name for f in dataclasses.fields(spec.cls)} - {'parent', 'name'}
  kwargs = dict(spec.defaults, num_classes=num_classes)
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
