"""One traced train step: the XLA:CPU program when lowered for CPU, the plain
flax/optax program when exported for GPUs and TPUs."""

import functools
import re

import jax
import ml_collections
import numpy as np
import pytest

from jaxlab import models
from jaxlab import onednn
from jaxlab import platforms
from jaxlab import steps
from jaxlab.preprocessing import Preprocess

# Small inputs keep the traces short; every model's layers are all there.
_IMAGE = (32, 32, 3)
_BATCH = 2


def _train_step(name):
  """The jitted, per-platform train step (SGD with momentum and gradient
  clipping) of model `name`, and abstract arguments for it."""
  model = models.create_model(ml_collections.ConfigDict({'name': name}), 5)
  optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.01, momentum=0.9, grad_clip_norm=1.0,
      frozen=()))
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), np.zeros((1,) + _IMAGE, np.float32)))
  state = jax.eval_shape(lambda v: steps.train_state_from_variables(
      model, optimizer, v, jax.random.PRNGKey(1)), variables)
  batch = {'image': jax.ShapeDtypeStruct((_BATCH,) + _IMAGE, np.uint8),
           'label': jax.ShapeDtypeStruct((_BATCH,), np.int32)}
  step = jax.jit(platforms.per_platform(functools.partial(
      steps.train_step, preprocess=Preprocess(), axis_name=None)))
  return step, state, batch


def _operations(mlir: str) -> set[str]:
  return set(re.findall(r'\b(?:stablehlo|chlo|mhlo)\.[a-z_]+', mlir))


def _cases(mlir: str) -> list[tuple[str, int]]:
  """(index operand, number of branches) of each `stablehlo.case`."""
  cases = []
  for match in re.finditer(r'"stablehlo\.case"\((%[\w#]+)\) \(', mlir):
    depth, branches = 0, 1
    for i in range(match.end(), len(mlir)):
      if mlir[i] == '{':
        depth += 1
      elif mlir[i] == '}':
        depth -= 1
        if depth == 0 and mlir.startswith('}, {', i):
          branches += 1
        elif depth == 0 and mlir.startswith('})', i):
          break
    cases.append((match.group(1), branches))
  return cases


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
@pytest.mark.parametrize('name', sorted(models.MODELS))
def test_accelerators_get_the_plain_program(name, platform):
  step, state, batch = _train_step(name)
  exported = jax.export.export(step, platforms=[platform])(state, batch)
  mlir = exported.mlir_module()
  operations = _operations(mlir)
  assert 'stablehlo.custom_call' not in operations, name
  assert 'stablehlo.optimization_barrier' not in operations, name
  # The one conditional is the platform selection, which lowering for one
  # platform resolves: a constant index mapped to the one branch kept, the
  # plain program.
  assert not operations & {'stablehlo.if', 'stablehlo.while'}, name
  (selector, _), (index, branches) = _cases(mlir)
  assert re.search(rf'{re.escape(selector)} = stablehlo.constant', mlir)
  assert branches == 1


@pytest.mark.skipif(not onednn.available(), reason='oneDNN is not installed')
@pytest.mark.parametrize('name', ['cnn_bn', 'resnet18'])
def test_cpu_gets_the_fast_program_from_the_same_trace(name):
  step, state, batch = _train_step(name)
  traced = step.trace(state, batch)
  cpu = traced.lower(lowering_platforms=('cpu',)).as_text()
  assert 'jaxlab_onednn_convolution' in cpu
  assert 'jaxlab_onednn_batch_norm_relu' in cpu
  cuda = traced.lower(lowering_platforms=('cuda',)).as_text()
  assert 'custom_call' not in cuda


def test_cpu_program_compiles_without_a_conditional():
  """XLA:CPU inlines the platform selection: only the program's own
  conditionals (`ops._stored`'s) remain."""
  step, state, batch = _train_step('fc')
  hlo = step.lower(state, batch).compile().as_text()
  assert 'conditional(' not in hlo
