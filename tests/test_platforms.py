"""One traced train step: the XLA:CPU program when lowered for CPU, the plain
flax/optax program when exported for GPUs and TPUs."""

import functools
import re

import jax
import jax.numpy as jnp
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


def _train_step(name, dtype=jnp.float32):
  """The jitted, per-platform train step (SGD with momentum and gradient
  clipping) of model `name` computing in `dtype`, and abstract arguments
  for it."""
  model = models.create_model(ml_collections.ConfigDict({'name': name}), 5,
                              dtype=dtype)
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


def _assert_accelerators_get_the_plain_program(name, dtype=jnp.float32):
  step, state, batch = _train_step(name, dtype)
  for platform in ('cuda', 'tpu'):  # One trace (jit caches it), two exports.
    exported = jax.export.export(step, platforms=[platform])(state, batch)
    mlir = exported.mlir_module()
    operations = _operations(mlir)
    assert 'stablehlo.custom_call' not in operations, (name, platform)
    assert 'stablehlo.optimization_barrier' not in operations, (name, platform)
    # The one conditional is the platform selection, which lowering for one
    # platform resolves: a constant index mapped to the one branch kept, the
    # plain program.
    assert not operations & {'stablehlo.if', 'stablehlo.while'}, name
    (selector, _), (_, branches) = _cases(mlir)
    assert re.search(rf'{re.escape(selector)} = stablehlo.constant', mlir)
    assert branches == 1
  return step, state, batch


@pytest.mark.parametrize('name', sorted(models.MODELS))
def test_accelerators_get_the_plain_program(name):
  _assert_accelerators_get_the_plain_program(name)


# Dense layers; convolutions and BatchNorm.
@pytest.mark.parametrize('name', ['fc', 'cnn_bn'])
def test_in_bfloat16_too(name):
  """half_precision: accelerators get flax's bfloat16 program; the CPU
  program runs oneDNN's bfloat16 kernels where the CPU has bfloat16
  instructions."""
  step, state, batch = _assert_accelerators_get_the_plain_program(
      name, jnp.bfloat16)
  cpu = step.trace(state, batch).lower(lowering_platforms=('cpu',)).as_text()
  target = 'jaxlab_onednn_dense' if name == 'fc' else (
      'jaxlab_onednn_convolution')
  assert (target in cpu) == onednn.bfloat16_supported()


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


@pytest.mark.parametrize('name,options', [
    ('fc', {}), ('cnn1', {}), ('cnn_bn', {}), ('cnn2', {}),
    ('scratch_cnn', {'dropout_rate': 0.25}),
    ('vgg16', {'widths': (4, 8, 8, 16, 16), 'classifier_width': 32}),
    ('resnet18', {'widths': (4, 8, 8, 16)})])
# Not ResNet-50 (its layers are ResNet-18's and a 1 x 1 convolution, each
# tested in test_layers.py; its ported logits in test_resnet.py, in both
# programs): at sizes a test affords, 50 layers that each normalise a batch
# of 4 over few positions make its float32 gradients chaotic. Measured at
# 64 x 64 with widths (16, 16, 32, 32): some leaves' gradients are 8e-2 off
# float64's in the plain program and up to 1.7e-1 in the CPU program, and
# which is closer varies by leaf.
def test_cpu_program_computes_what_the_plain_program_does(name, options):
  """Every model's training loss, logits, BatchNorm updates and gradients:
  the CPU program's fast paths against flax's own layers."""
  model = models.create_model(
      ml_collections.ConfigDict({'name': name, **options}), 5)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(4,) + _IMAGE).astype(np.float32)
  labels = np.arange(4) % 5
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)

  def loss(params, cpu):
    with platforms.tracing_cpu_program(cpu):
      logits, updates = model.apply(
          {**variables, 'params': params}, x, train=True,
          rngs={'dropout': jax.random.PRNGKey(1)}, mutable=['batch_stats'])
      return steps.cross_entropy(logits, labels).mean(), (logits, updates)

  gradients = jax.jit(jax.value_and_grad(loss, has_aux=True),
                      static_argnums=1)
  fast, plain = (gradients(variables['params'], cpu) for cpu in (True, False))
  np.testing.assert_allclose(fast[0][0], plain[0][0], rtol=1e-5)
  # Gradients compare at the scale of the largest: some are zero but for
  # rounding (a convolution's bias before BatchNorm), and a kernel's gradient
  # sums batch x positions products in an order that depends on the CPU's
  # oneDNN kernel. Measured against float64 (ResNet-18 here, Intel Xeon with
  # AMX): the CPU program's largest error is 1.5e-5 of the scale, the plain
  # program's 5e-7; a wrong gradient is off by far more than either.
  scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(plain[1]))
  for part, atol in ((1, 3e-5 * scale), (0, 1e-4)):
    jax.tree.map(lambda a, b, atol=atol: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=atol), fast[part], plain[part])
