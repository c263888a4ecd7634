"""Optimizers as optax chains, built from the config's `optimizer` section.

`create_optimizer` returns one `optax.GradientTransformation` made of:
  gradient-norm clipping (optional) -> the update rule -> nothing else,
wrapped in `optax.multi_transform` so that parameters matched by the
`frozen` patterns get `optax.set_to_zero()`: no update, no optimizer state,
and no part in the clipping norm.
"""

import re
from typing import Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import optax

from jaxlab import ops
from jaxlab import platforms
from jaxlab.errors import UserError

TRAINABLE, FROZEN = 'trainable', 'frozen'


def global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves together: `optax.tree.norm`; in the CPU
  program each leaf's squares are summed in one pass (`ops.sum_of_squares`),
  where XLA:CPU would store them first."""
  if platforms.cpu_program() is None:
    return optax.tree.norm(tree)
  return jnp.sqrt(sum(ops.sum_of_squares(leaf)
                      for leaf in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm`: updates whose global norm exceeds
  `max_norm` are scaled down to it. In the CPU program the norm is
  `global_norm`'s one-pass sum."""
  plain = optax.clip_by_global_norm(max_norm)

  def update(updates, state, params=None):
    if platforms.cpu_program() is None:
      return plain.update(updates, state, params)
    norm = global_norm(updates)
    clipped = jax.tree.map(
        lambda t: jnp.where(norm < max_norm, t,
                            (t / norm.astype(t.dtype)) * max_norm), updates)
    return clipped, state

  return optax.GradientTransformation(plain.init, update)


def rmsprop_momentum(learning_rate: float, alpha: float = 0.99,
                     eps: float = 1e-8,
                     momentum: float = 0.9) -> optax.GradientTransformation:
  """RMSprop with momentum exactly as report A's equation (1).

    G_t = alpha * G_{t-1} + (1 - alpha) * g_t**2
    D_t = momentum * D_{t-1} - learning_rate / sqrt(G_t + eps) * g_t
    w_t = w_{t-1} + D_t

  `eps` sits inside the square root and momentum accumulates the already
  scaled step (PyTorch's RMSprop differs on both counts). G_0 = D_0 = 0.
  """
  return optax.chain(
      optax.scale_by_rms(decay=alpha, eps=eps, initial_scale=0.0,
                         eps_in_sqrt=True),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum),
  )


def sgd(learning_rate: float,
        momentum: float = 0.0) -> optax.GradientTransformation:
  """SGD with PyTorch's momentum convention: v = m * v + g; w -= lr * v."""
  return optax.sgd(learning_rate, momentum=momentum or None)


_RULES = {
    'sgd': (sgd, ('momentum',)),
    'rmsprop': (rmsprop_momentum, ('alpha', 'eps', 'momentum')),
}
# Keys of the `optimizer` section that every optimizer understands.
_COMMON_KEYS = ('name', 'learning_rate', 'grad_clip_norm', 'frozen')


def path_names(params) -> list[str]:
  """Parameter paths as dotted names, e.g. 'conv1.kernel'."""
  return ['.'.join(path) for path in
          flax.traverse_util.flatten_dict(params).keys()]


# `features[0:15]`: torchvision-style modules `features.0` to `features.14`.
_INDEX_SLICE = re.compile(r'^(\w+)\[(\d*):(\d*)\]$')


def _matcher(pattern: str):
  """A predicate over dotted parameter paths for one `frozen` entry.

  An entry is either an index slice over numbered modules, like
  'features[0:15]' (torchvision's `features[0:15]`: `features.0` to
  `features.14`), or a regular expression matched at the start of the path,
  like 'classifier' or r'conv1\.'.
  """
  sliced = _INDEX_SLICE.match(pattern)
  if sliced:
    prefix, start, stop = sliced.groups()
    start = int(start or 0)
    stop = int(stop) if stop else None
    numbered = re.compile(rf'^{re.escape(prefix)}\.(\d+)\.')

    def in_slice(name):
      m = numbered.match(name)
      return bool(m) and start <= int(m.group(1)) and (
          stop is None or int(m.group(1)) < stop)
    return in_slice
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise UserError(f'config optimizer.frozen pattern {pattern!r} is not a '
                    f'regular expression: {e}') from None
  return lambda name: regex.match(name) is not None


def frozen_mask(params, patterns: Sequence[str]):
  """A pytree like `params` of TRAINABLE / FROZEN labels.

  A parameter is frozen when any entry of `patterns` matches its dotted path
  (see `_matcher`). An entry that matches nothing is an error: it is
  almost certainly a typo.
  """
  matchers = {p: _matcher(p) for p in patterns}
  flat = flax.traverse_util.flatten_dict(params)
  labels, used = {}, set()
  for path in flat:
    name = '.'.join(path)
    hits = [p for p, matches in matchers.items() if matches(name)]
    used.update(hits)
    labels[path] = FROZEN if hits else TRAINABLE
  unused = [p for p in patterns if p not in used]
  if unused:
    raise UserError(f'config optimizer.frozen pattern {unused[0]!r} matches no '
                    f'parameter; parameter names look like {path_names(params)[:3]}')
  return flax.traverse_util.unflatten_dict(labels)


def check_name(name: str) -> None:
  if name not in _RULES:
    raise UserError(f'config optimizer.name={name!r} is not an optimizer; '
                    f'choose one of {sorted(_RULES)}')


def create_optimizer(optimizer_config, labels) -> optax.GradientTransformation:
  """Builds the optimizer named by `optimizer_config.name`.

  Args:
    optimizer_config: the config's `optimizer` section.
    labels: a pytree like the params of TRAINABLE / FROZEN (`frozen_mask`).
  """
  name = optimizer_config.name
  check_name(name)
  rule, options = _RULES[name]
  # Options of other optimizers are ignored, so that a config written for
  # one can be run with another by overriding `optimizer.name` alone.
  known = {k for _, opts in _RULES.values() for k in opts}
  kwargs = {}
  for key, value in optimizer_config.items():
    if key in _COMMON_KEYS or (key in known and key not in options):
      continue
    if key not in options:
      raise UserError(f'config optimizer.{key} is not an option of optimizer '
                      f'{name!r}; its options are {sorted(options)}')
    kwargs[key] = value
  update_rule = rule(optimizer_config.learning_rate, **kwargs)
  clip_norm = optimizer_config.get('grad_clip_norm', 0.0)
  if clip_norm:
    update_rule = optax.chain(clip_by_global_norm(clip_norm), update_rule)
  return optax.multi_transform(
      {TRAINABLE: update_rule, FROZEN: optax.set_to_zero()}, labels)
