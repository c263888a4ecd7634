"""The train state and the jitted, `jax.pmap`-ed train and eval steps.

Nothing here imports TensorFlow: the steps run on synthetic batches too (the
benchmarks), on any JAX backend.
"""

import functools
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from flax import struct
from flax.training import train_state

from jaxlab import optimizers
from jaxlab import platforms
from jaxlab import prng
from jaxlab import runtime
from jaxlab.preprocessing import Preprocess

AXIS = 'batch'  # The pmap axis: gradients and BatchNorm statistics average over it.


@struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy
  grad_norm: metrics.Average.from_output('grad_norm')


@struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (from flax), plus:

  batch_stats: BatchNorm running statistics ({} for models without BN).
  rng: the run's base key; each step folds in its step number and device.
  frozen: paths (tuples of names) of parameters that never train; they get
    no gradient, so their layers cost no backward pass of their own.
  """
  batch_stats: Any
  rng: jax.Array
  frozen: frozenset = struct.field(pytree_node=False, default=frozenset())


def create_train_state(model, optimizer_config, rng: jax.Array,
                       image_shape: tuple[int, ...],
                       load_variables=None) -> TrainState:
  """Initialises `model` on a dummy batch and builds its optimizer.

  Args:
    model: a linen module called as `model(images, train=...)`.
    optimizer_config: the config's `optimizer` section.
    rng: key for parameter initialisation and for the run's randomness.
    image_shape: (height, width, channels) of one input image.
    load_variables: optional function from the initial variables ({'params':
      ..., 'batch_stats': ...}) to those to start from (pretrained weights).
  """
  init_rng, state_rng = jax.random.split(rng)
  # Initialisation runs once: LLVM's optimisations would cost seconds of
  # compile time (mostly in the random number generator) and save nothing.
  init = jax.jit(platforms.per_platform(
      functools.partial(_initial_variables, model)),
                 compiler_options={'xla_backend_optimization_level': 0})
  variables = init(init_rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  if load_variables is not None:
    variables = load_variables(variables)
  # Before the optimizer's state is allocated: else it lands beside the
  # free memory initialisation left (VGG16: temporaries twice its kernels'
  # size), which the process keeps (see `runtime.release_free_memory`).
  jax.block_until_ready(variables)
  runtime.release_free_memory()
  return train_state_from_variables(model, optimizer_config, variables,
                                    state_rng)


def _initial_variables(model, rng, images):
  """`model.init`'s variables. In the XLA:CPU program, its random numbers
  come from `prng.UNROLLED_THREEFRY`: the same numbers, without the
  temporaries of XLA:CPU's threefry (VGG16: 1.2 GiB, the run's peak)."""
  if platforms.cpu_program() is not None:
    rng = prng.unrolled(rng)
  return model.init({'params': rng, 'dropout': rng}, images, train=False)


def train_state_from_variables(model, optimizer_config, variables: dict,
                               rng: jax.Array) -> TrainState:
  """The train state of `model` starting from `variables` ({'params': ...,
  'batch_stats': ...}), with the config's optimizer; `rng` is the run's key.
  """
  params = variables['params']
  labels = optimizers.frozen_mask(params, optimizer_config.get('frozen', ()))
  frozen = frozenset(
      path for path, label in flax.traverse_util.flatten_dict(labels).items()
      if label == optimizers.FROZEN)
  return TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optimizers.create_optimizer(optimizer_config, labels),
      batch_stats=variables.get('batch_stats', {}), rng=rng,
      frozen=frozen)


def _partition(params, frozen: frozenset):
  flat = flax.traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if k not in frozen}
  fixed = {k: v for k, v in flat.items() if k in frozen}
  return trainable, fixed


def _merge(trainable: dict, fixed: dict):
  return flax.traverse_util.unflatten_dict({**trainable, **fixed})


def _variables(params, batch_stats) -> dict:
  if batch_stats:
    return {'params': params, 'batch_stats': batch_stats}
  return {'params': params}


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy of integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def _metrics(cls, axis_name: str | None, **outputs):
  """`cls` (a clu Collection) of this step's outputs, over the devices of
  `axis_name` (none: this computation's alone)."""
  if axis_name is None:
    return cls.single_from_model_output(**outputs)
  return cls.gather_from_model_output(axis_name=axis_name, **outputs)


def train_step(state: TrainState, batch: dict, preprocess: Preprocess,
               axis_name: str | None = AXIS):
  """One SGD step on this device's share of the global batch (under pmap).

  The loss is the mean over the device's examples; gradients are averaged
  over the devices of `axis_name`, so the update equals that of the whole
  global batch on one device (`axis_name=None`: a step of one jitted
  computation, without collectives). Returns the new state and this step's
  `TrainMetrics`.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  augment_rng, dropout_rng = jax.random.split(step_rng)
  device = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  per_device = batch['label'].shape[0]
  images = preprocess(
      batch['image'], augment_rng,
      example_ids=device * per_device + jnp.arange(per_device))
  labels = batch['label']
  dropout_rng = jax.random.fold_in(dropout_rng, device)
  trainable, fixed = _partition(state.params, state.frozen)

  def loss_fn(trainable):
    logits, updates = state.apply_fn(
        _variables(_merge(trainable, fixed), state.batch_stats), images,
        train=True, rngs={'dropout': dropout_rng},
        mutable=['batch_stats'])
    losses = cross_entropy(logits, labels)
    return losses.mean(), (losses, logits, updates)

  (_, (losses, logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(trainable)
  # Static; on one device the mean is a copy.
  if axis_name is not None and jax.lax.psum(1, axis_name) > 1:
    grads = jax.lax.pmean(grads, axis_name)
  grad_norm = optimizers.global_norm(grads)
  full_grads = _merge(grads, jax.tree.map(jnp.zeros_like, fixed))
  new_state = state.apply_gradients(
      grads=full_grads,
      batch_stats=updates.get('batch_stats', state.batch_stats))
  step_metrics = _metrics(TrainMetrics, axis_name, loss=losses,
                          logits=logits, labels=labels, grad_norm=grad_norm)
  return new_state, step_metrics


def eval_step(state: TrainState, batch: dict, preprocess: Preprocess,
              axis_name: str | None = AXIS):
  """Loss and accuracy of the real (mask 1) examples of a padded batch."""
  logits = state.apply_fn(_variables(state.params, state.batch_stats),
                          preprocess(batch['image']), train=False)
  return _metrics(EvalMetrics, axis_name,
                  loss=cross_entropy(logits, batch['label']), logits=logits,
                  labels=batch['label'], mask=batch['mask'])


def replicate(tree):
  """A copy of `tree` with every array replicated on all local devices, as
  the pmapped steps take and return the train state (see `pmapped_steps`).

  Always new buffers: the train step donates them, and `tree`'s own arrays
  stay valid.
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
  return jax.device_put(tree, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()), may_alias=False)


def unreplicate(tree):
  """A copy of a replicated `tree` on the first local device.

  A copy, so that it can be kept (saved in the background, say) while the
  train step donates the replicated original.
  """
  return jax.tree.map(lambda x: jnp.copy(x.addressable_data(0)), tree)


def pmapped_steps(preprocess: Preprocess):
  """`train_step` and `eval_step` compiled for all local devices.

  Both map over the batches' leading (device) axis; the train state is not
  mapped (`in_axes=None`): it is one array per leaf, replicated on every
  device (`replicate`), and the new state comes back the same way. This
  keeps the state's shapes free of pmap's device axis inside the step, so
  that XLA updates parameters and momentum in place: with a leading axis of
  1, the reshapes around each leaf made it copy them instead (fc's step: two
  extra copies of its largest kernel).

  The train step donates its input state, so the old state's buffers are
  reused for the new one. Both are lowered per platform
  (`platforms.per_platform`): the XLA:CPU program on CPU, flax's and optax's
  plain program on GPUs and TPUs.
  """
  p_train = jax.pmap(
      platforms.per_platform(functools.partial(train_step,
                                               preprocess=preprocess)),
      axis_name=AXIS, in_axes=(None, 0), out_axes=(None, 0),
      donate_argnums=(0,))
  p_eval = jax.pmap(
      platforms.per_platform(functools.partial(eval_step,
                                               preprocess=preprocess)),
      axis_name=AXIS, in_axes=(None, 0))
  return p_train, p_eval
