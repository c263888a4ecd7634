"""The `--summary` table: every layer's output shape, parameters and FLOPs.

Counts follow torchinfo, as in report A's Fig. 1: a convolution's or dense
layer's mult-adds are its parameter count (weights and bias) times the
number of positions it is applied at, so `cnn2` at 4 x 180 x 180 with batch
64 gives 48.02 G; a BatchNorm's are its parameter count times the batch
size. Any `nn.Conv`, `nn.Dense` or `nn.BatchNorm` counts (`jaxlab.layers`'
are those); functions without parameters (pooling, ReLU) count none.
"""

import dataclasses
import math

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from jaxlab import input_pipeline
from jaxlab import models
from jaxlab import optimizers

_PER_POSITION = (nn.Conv, nn.Dense)  # Mult-adds: params x positions.
_PER_EXAMPLE = (nn.BatchNorm,)  # Mult-adds: params x batch size.


@dataclasses.dataclass
class Layer:
  name: str
  kind: str
  output_shape: tuple[int, ...]
  params: int
  mult_adds: int  # For the whole batch.


@dataclasses.dataclass
class Summary:
  layers: list[Layer]
  total_params: int
  trainable_params: int
  batch_size: int

  @property
  def non_trainable_params(self) -> int:
    return self.total_params - self.trainable_params

  @property
  def mult_adds(self) -> int:
    return sum(layer.mult_adds for layer in self.layers)

  def to_text(self) -> str:
    header = ('Layer', 'Type', 'Output shape', 'Params', 'GFLOPs')
    rows = [(l.name, l.kind, str(list(l.output_shape)),
             f'{l.params:,}' if l.params else '',
             f'{2 * l.mult_adds / 1e9:.3f}' if l.mult_adds else '')
            for l in self.layers]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    fmt = lambda r: '  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    rule = '-' * len(fmt(header))
    lines = [rule, fmt(header), rule, *map(fmt, rows), rule,
             f'Total mult-adds (G): {self.mult_adds / 1e9:.2f}  '
             f'(FLOPs: {2 * self.mult_adds / 1e9:.2f} G for a batch of '
             f'{self.batch_size})',
             f'Total params: {self.total_params:,}',
             f'Trainable params: {self.trainable_params:,}',
             f'Non-trainable params: {self.non_trainable_params:,}']
    return '\n'.join(lines)


def count_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def summarize(model: nn.Module, image_shape: tuple[int, ...], batch_size: int,
              frozen_patterns=()) -> Summary:
  """Traces `model` on a [batch_size, *image_shape] input without computing.

  No weights are materialised (shapes only), so it is instant for any model.
  """
  calls = []
  running = []  # Modules whose __call__ is running (a subclass's calls
  # its flax base's: one layer, one row).

  def record(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != '__call__' or not module.path or
        any(m is module for m in running)):
      return next_fun(*args, **kwargs)
    running.append(module)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      running.pop()
    calls.append((module, out.shape))
    return out

  with nn.intercept_methods(record):
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0),
                           jnp.zeros((batch_size,) + tuple(image_shape)),
                           train=False))
  params = variables['params']
  flat = flax.traverse_util.flatten_dict(params)
  layers = []
  for module, shape in calls:
    path = tuple(module.path)
    n_params = sum(math.prod(v.shape) for k, v in flat.items()
                   if k[:len(path)] == path)
    if isinstance(module, _PER_POSITION):
      mult_adds = n_params * math.prod(shape[:-1])
    elif isinstance(module, _PER_EXAMPLE):
      mult_adds = n_params * shape[0]
    else:
      mult_adds = 0
    layers.append(Layer('.'.join(path), type(module).__name__, tuple(shape),
                        n_params, mult_adds))
  labels = flax.traverse_util.flatten_dict(
      optimizers.frozen_mask(params, frozen_patterns))
  trainable = sum(math.prod(flat[k].shape) for k, label in labels.items()
                  if label == optimizers.TRAINABLE)
  return Summary(layers, count_params(params), trainable, batch_size)


def summarize_config(config) -> Summary:
  """The layer table of the config's model, without loading any data."""
  image_shape = (config.data.image_size, config.data.image_size,
                 config.data.channels)
  model = models.create_model(config.model,
                              input_pipeline.num_classes(config.data))
  return summarize(model, image_shape, config.batch_size,
                   config.optimizer.frozen)
