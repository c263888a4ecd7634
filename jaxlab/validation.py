"""Checks of a config's values that need no data, made before any slow work.

`check_config(config)` raises a `UserError` naming the key, the value and
what would be right, for the first value that cannot be right: a negative
learning rate, a momentum of 1, a batch of 0, fractions that do not add up.
Keys a config lacks (an optimizer's options, a model's) are not checked.
"""

import math
import numbers
from typing import Callable

from jaxlab import input_pipeline
from jaxlab import models
from jaxlab import optimizers
from jaxlab.errors import UserError
from jaxlab.preprocessing import Preprocess


def _number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool) and
          math.isfinite(value))


def _integer(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# key: (whether the value is allowed, the allowed values in words).
_RANGES: dict[str, tuple[Callable, str]] = {
    'optimizer.learning_rate': (lambda v: _number(v) and v > 0, '> 0'),
    'optimizer.momentum': (lambda v: _number(v) and 0 <= v < 1, 'in [0, 1)'),
    'optimizer.alpha': (lambda v: _number(v) and 0 < v < 1, 'in (0, 1)'),
    'optimizer.eps': (lambda v: _number(v) and v > 0, '> 0'),
    'optimizer.grad_clip_norm': (lambda v: _number(v) and v >= 0,
                                 '>= 0 (0: no clipping)'),
    'model.dropout_rate': (lambda v: _number(v) and 0 <= v < 1, 'in [0, 1)'),
    'batch_size': (lambda v: _integer(v) and v >= 1, 'an integer >= 1'),
    'eval_batch_size': (lambda v: _integer(v) and v >= 1, 'an integer >= 1'),
    'num_epochs': (lambda v: _integer(v) and v >= 1, 'an integer >= 1'),
    'seed': (lambda v: _integer(v) and v >= 0, 'an integer >= 0'),
    'checkpoint.every_epochs': (lambda v: _integer(v) and v >= 1,
                                'an integer >= 1'),
    'checkpoint.every_steps': (lambda v: _integer(v) and v >= 0,
                               'an integer >= 0 (0: off)'),
    'checkpoint.keep': (lambda v: _integer(v) and v >= 1, 'an integer >= 1'),
    'log_every_steps': (lambda v: _integer(v) and v >= 0,
                        'an integer >= 0 (0: off)'),
}

_MISSING = object()


def _get(config, key: str):
  value = config
  for part in key.split('.'):
    if part not in value:
      return _MISSING
    value = value[part]
  return value


def check_config(config) -> None:
  """Raises a one-line `UserError` for the first value of `config` (an
  experiment config) outside its allowed range."""
  for key, (allowed, words) in _RANGES.items():
    value = _get(config, key)
    if value is not _MISSING and not allowed(value):
      raise UserError(f'config {key}={value!r} must be {words}')
  if config.model.name not in models.MODELS:
    raise UserError(f'config model.name={config.model.name!r} is not a model; '
                    f'choose one of {sorted(models.MODELS)}')
  optimizers.check_name(config.optimizer.name)
  input_pipeline.check_data_config(config.data)
  Preprocess.from_config(config.data)  # Normalisation and augmentation.


def check_seeds(seeds) -> None:
  """A suite's seeds: at least one, each an integer >= 0, none twice."""
  seeds = tuple(seeds)
  if not seeds:
    raise UserError('config seeds is empty; give at least one seed')
  bad = [s for s in seeds if not _integer(s) or s < 0]
  if bad:
    raise UserError(f'config seeds={seeds} holds {bad[0]!r}; seeds must be '
                    'integers >= 0')
  repeated = sorted({s for s in seeds if seeds.count(s) > 1})
  if repeated:
    raise UserError(f'config seeds={seeds} repeats {repeated}; each seed '
                    'once')
