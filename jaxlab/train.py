"""`train_and_evaluate`: the one training loop every experiment runs through.

Per epoch: train on every full batch of the training split, evaluate on the
validation split, write `history.jsonl` and TensorBoard events, and a
checkpoint every `checkpoint.every_epochs` epochs (and after the last); also
a checkpoint every `checkpoint.every_steps` steps, and the train loss every
`log_every_steps`. At the end: evaluate on the test split and write
`results.json`. Running again on the same workdir resumes from the newest
checkpoint, also mid-epoch, and ends with exactly the numbers of an
uninterrupted run. SIGTERM or SIGINT stops the run after its current step,
with a checkpoint (`jaxlab.preemption`).
"""

import dataclasses
import functools
import json
import math
import os
import time

import flax.serialization
import jax
import ml_collections
import numpy as np
from absl import logging
from flax import jax_utils
from tqdm import tqdm

from jaxlab import input_pipeline
from jaxlab import loader
from jaxlab import models
from jaxlab import preemption
from jaxlab import pretrained
from jaxlab import records
from jaxlab import runtime
from jaxlab import steps
from jaxlab import storage
from jaxlab import summary as summary_lib
from jaxlab import validation
from jaxlab import workdir_lock
from jaxlab.checkpointing import Checkpoints
from jaxlab.checkpointing import Position
from jaxlab.errors import UserError
from jaxlab.preprocessing import Preprocess

# Keys that may differ between a run and its resumption.
_RESUMABLE_CHANGES = ('num_epochs', 'checkpoint', 'log_every_steps',
                      'progress_bar', 'data.cache', 'data.memory_budget_gb',
                      'data.threads', 'data.workers')


class TrainingDiverged(UserError):
  """The training loss became NaN or infinite."""


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _check_same_run(workdir: str, config_dict: dict) -> None:
  """A workdir holds one run: resuming it with another config is an error."""
  saved = records.read_config(workdir)
  if saved is None:
    return
  old, new = _flat(saved), _flat(config_dict)
  for key in sorted(set(old) | set(new)):
    if key in _RESUMABLE_CHANGES or key.split('.')[0] in _RESUMABLE_CHANGES:
      continue
    if old.get(key) != new.get(key):
      raise UserError(
          f'workdir {workdir} holds a run with config {key}={old.get(key)!r}, '
          f'not {new.get(key)!r}; use another --workdir for a new run')


def evaluate(p_eval, state, split, batch_size: int,
             sharding: input_pipeline.Sharding,
             loading: loader.Loading | None = None) -> dict:
  """Loss, accuracy and example count over every example of `split`, once."""
  total = None
  for batch in _on_devices(input_pipeline.eval_batches(split, batch_size,
                                                       sharding, loading),
                           sharding):
    m = p_eval(state, batch)
    total = m if total is None else total.merge(m)
  total = jax_utils.unreplicate(total)
  out = {k: float(v) for k, v in total.compute().items()}
  out['count'] = int(round(float(total.loss.count)))
  return out


def _on_devices(batches, sharding: input_pipeline.Sharding):
  """`batches` put on the devices ahead of the step that takes them; with
  several processes, pmap takes each process's numpy batches as they are."""
  if sharding.process_count > 1:
    return batches
  return loader.to_devices(batches)


def _host_metrics(device_metrics) -> steps.TrainMetrics:
  """One step's metrics from the devices, on the host in float64."""
  return jax.tree.map(lambda x: np.float64(x[0]),
                      jax.device_get(device_metrics))


def _merge(total, metrics):
  return metrics if total is None else total.merge(metrics)


def _metrics_to_floats(metrics) -> dict:
  """A checkpoint's `epoch_metrics`: float64 survives JSON exactly."""
  return jax.tree.map(float, flax.serialization.to_state_dict(metrics))


def _metrics_from_floats(floats: dict) -> steps.TrainMetrics:
  return flax.serialization.from_state_dict(
      steps.TrainMetrics.empty(), jax.tree.map(np.float64, floats))


def _where(position: Position, steps_per_epoch: int) -> str:
  """'epoch 3' at an epoch's end, else 'epoch 4, step 5 of 12'."""
  if not position.steps_into_epoch:
    return f'epoch {position.epochs_done}'
  return (f'epoch {position.epochs_done + 1}, step '
          f'{position.steps_into_epoch} of {steps_per_epoch}')


class _Loop:
  """What the steps of every epoch share: the config, the checkpoints, the
  metric writer, the stop signals and how batches are read."""

  def __init__(self, config, checkpoints, writer, stop, steps_per_epoch):
    self.config, self.checkpoints, self.writer = config, checkpoints, writer
    self.stop, self.steps_per_epoch = stop, steps_per_epoch
    self.loading = loader.Loading.from_config(config.data)

  def save(self, state, position: Position) -> None:
    self.checkpoints.save(position.global_step(self.steps_per_epoch),
                          steps.unreplicate(state), position)

  def stop_here(self, state, position: Position) -> None:
    """Saves a checkpoint at `position`, waits for it, and stops the run."""
    self.save(state, position)
    self.checkpoints.wait()
    raise preemption.Preempted(
        f'stopped by {self.stop.received} at '
        f'{_where(position, self.steps_per_epoch)} (after step '
        f'{position.global_step(self.steps_per_epoch)}), with a checkpoint; '
        'run the same command again to resume from it')


def _train_epoch(loop: _Loop, train_fn, state, dataset, epoch: int,
                 start: Position, sharding: input_pipeline.Sharding):
  """One epoch of training from `start` (its beginning, or a mid-epoch
  checkpoint's position), with the checkpoints, logs and stops due within
  it; returns the state, the epoch's metrics, images/s, and whether a stop
  was asked for at its last step."""
  config, n_steps = loop.config, loop.steps_per_epoch
  first = start.steps_into_epoch
  batches = _on_devices(input_pipeline.train_batches(
      dataset.train, config.batch_size, config.seed, epoch, sharding,
      first_step=first, loading=loop.loading), sharding)
  bar = tqdm(total=(n_steps - first) * config.batch_size, unit='img',
             leave=False, desc=f'epoch {epoch}/{config.num_epochs}',
             dynamic_ncols=True,
             # None: shown on a terminal only, not in logs.
             disable=(None if config.progress_bar and jax.process_index() == 0
                      else True))
  # Merged on the host in float64, step by step in order, so that an epoch
  # resumed from a mid-epoch checkpoint sums exactly as an uninterrupted one.
  total = (_metrics_from_floats(start.epoch_metrics)
           if start.epoch_metrics else None)
  window, in_flight, stopping = None, None, False
  start_time = time.perf_counter()
  for step_in_epoch, batch in enumerate(batches, first + 1):
    state, metrics = train_fn(state, batch)
    # One step in flight at a time: the bar shows real throughput, and no
    # queue of pending steps builds up.
    if in_flight is not None:
      done = _host_metrics(in_flight)
      total, window = _merge(total, done), _merge(window, done)
    in_flight = metrics
    bar.update(config.batch_size)
    position = Position(epoch - 1, step_in_epoch)
    step = position.global_step(n_steps)
    log = config.log_every_steps and step % config.log_every_steps == 0
    save = (config.checkpoint.every_steps and step_in_epoch < n_steps and
            step % config.checkpoint.every_steps == 0)
    stop = loop.stop.requested(step)  # On every step, by every process.
    if not (log or save or stop):
      continue
    done = _host_metrics(in_flight)
    total, window, in_flight = _merge(total, done), _merge(window, done), None
    if log:
      loss = window.compute()['loss']
      loop.writer.write_scalars(step, {'step_train_loss': loss})
      window = None
    if step_in_epoch == n_steps:
      stopping = stop  # The epoch's end saves, after its evaluation.
      continue
    position = dataclasses.replace(position,
                                   epoch_metrics=_metrics_to_floats(total))
    if stop:
      bar.close()
      loop.stop_here(state, position)
    loop.save(state, position)
  if in_flight is not None:
    total = _merge(total, _host_metrics(in_flight))
  seconds = time.perf_counter() - start_time
  bar.close()
  computed = {k: float(v) for k, v in total.compute().items()}
  return (state, computed, (n_steps - first) * config.batch_size / seconds,
          stopping)


def _compile_train_step(p_train, state, dataset, config, sharding):
  """Compiles the train step ahead of time; returns it and the seconds taken.

  Then the memory that initialising, restoring and compiling freed goes
  back to the OS (`runtime.release_free_memory`).
  """
  local = sharding.local_batch_size(config.batch_size, 'batch_size')
  per_device = local // sharding.local_device_count
  example = {
      'image': jax.ShapeDtypeStruct(
          (sharding.local_device_count, per_device) +
          dataset.train.image_shape, np.uint8),
      'label': jax.ShapeDtypeStruct(
          (sharding.local_device_count, per_device), np.int32)}
  start = time.perf_counter()
  if sharding.process_count > 1:
    # Here pmap's ahead-of-time executables take global arrays, not this
    # process's batches: compile by a step on a throwaway copy of the state.
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), example)
    jax.block_until_ready(p_train(steps.replicate(state), zeros))
    train_fn = p_train
  else:
    train_fn = p_train.lower(state, example).compile()
  seconds = time.perf_counter() - start
  runtime.release_free_memory()
  return train_fn, seconds


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates the experiment `config` in `workdir`.

  Returns the contents of `results.json`.
  """
  validation.check_config(config)
  with storage.writing(workdir, None):
    os.makedirs(workdir, exist_ok=True)
  # One run per workdir; in a multi-host run, process 0 holds the lock.
  with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
    return _train_and_evaluate_holding_lock(config, workdir)


def _train_and_evaluate_holding_lock(config, workdir: str) -> dict:
  """`train_and_evaluate` once the workdir is this run's."""
  # Through JSON, so that it compares equal to the saved config.json.
  config_dict = json.loads(config.to_json())
  _check_same_run(workdir, config_dict)
  sharding = input_pipeline.Sharding.current()
  # Checked before any slow work: both must split over the devices.
  sharding.local_batch_size(config.batch_size, 'batch_size')
  sharding.local_batch_size(config.eval_batch_size, 'eval_batch_size')
  preprocess = Preprocess.from_config(config.data)

  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'),
                            keep=config.checkpoint.keep)
  try:
    latest = checkpoints.latest_position()
    if latest and latest.epochs_done > config.num_epochs:
      raise UserError(f'workdir {workdir} holds a run already trained for '
                      f'{latest.epochs_done} epochs, more than num_epochs='
                      f'{config.num_epochs}; use another --workdir')
    finished = records.read_results(workdir)
    if finished and finished['epochs'] == config.num_epochs:
      logging.info('Run in %s already finished %d epochs; results are in %s.',
                   workdir, config.num_epochs,
                   os.path.join(workdir, records.RESULTS))
      return finished
    if finished and jax.process_index() == 0:
      # Continued for more epochs: the old results no longer describe it.
      with storage.writing(workdir, None):
        os.remove(os.path.join(workdir, records.RESULTS))
    return _train(config, workdir, config_dict, checkpoints,
                  bool(checkpoints.steps()), preprocess, sharding)
  finally:
    checkpoints.close()


def _train_epochs(loop: _Loop, train_fn, p_eval, state, dataset,
                  start: Position, workdir: str, sharding):
  """Trains from `start` to the last epoch, evaluating, recording and
  checkpointing each; returns the state."""
  config = loop.config
  for epoch in range(start.epochs_done + 1, config.num_epochs + 1):
    state, train, images_per_sec, stopping = _train_epoch(
        loop, train_fn, state, dataset, epoch,
        start if epoch == start.epochs_done + 1 else Position(epoch - 1),
        sharding)
    if not math.isfinite(train['loss']):
      last = loop.checkpoints.latest_position()
      raise TrainingDiverged(
          f'training loss became {train["loss"]} in epoch {epoch}; stopped '
          'without saving it (last good checkpoint: '
          f'{_where(last, loop.steps_per_epoch) if last else "none"}); try a '
          f'lower --config.optimizer.learning_rate (now '
          f'{config.optimizer.learning_rate}) with a new --workdir')
    val = evaluate(p_eval, state, dataset.val, config.eval_batch_size,
                   sharding, loop.loading)
    entry = {'epoch': epoch, 'train_loss': train['loss'],
             'train_accuracy': train['accuracy'], 'val_loss': val['loss'],
             'val_accuracy': val['accuracy'],
             'images_per_sec': images_per_sec}
    loop.writer.write_scalars(epoch, {**{k: v for k, v in entry.items()
                                         if k != 'epoch'},
                                      'grad_norm': train['grad_norm']})
    # History first: a run killed before its checkpoint is complete redoes
    # the epoch, and resuming trims the history back to the checkpoint.
    if jax.process_index() == 0:
      records.append_history(workdir, entry)
    end = Position(epoch)
    every_steps = config.checkpoint.every_steps
    last = epoch == config.num_epochs
    if stopping and not last:
      loop.stop_here(state, end)
    if (last or epoch % config.checkpoint.every_epochs == 0 or
        (every_steps and
         end.global_step(loop.steps_per_epoch) % every_steps == 0)):
      loop.save(state, end)
  return state


def _train(config, workdir, config_dict, checkpoints, resuming: bool,
           preprocess, sharding) -> dict:
  """The body of `train_and_evaluate`, from data loading to results."""
  dataset = input_pipeline.load_dataset(
      config.data, progress=config.progress_bar and jax.process_index() == 0)
  logging.info('Data: %s; %d train / %d val / %d test examples, %d classes.',
               dataset.source, len(dataset.train), len(dataset.val),
               len(dataset.test), dataset.num_classes)
  if len(dataset.train) < config.batch_size:
    raise UserError(f'config batch_size={config.batch_size} is larger than the '
                    f'{len(dataset.train)} training examples')
  steps_per_epoch = input_pipeline.steps_per_epoch(dataset.train,
                                                   config.batch_size)
  image_shape = dataset.train.image_shape
  model = models.create_model(
      config.model, dataset.num_classes, axis_name=steps.AXIS,
      dtype=models.compute_dtype(config.half_precision))
  summary = summary_lib.summarize(model, image_shape, config.batch_size,
                                  config.optimizer.frozen)
  load_variables = None
  if config.model.pretrained and not resuming:
    load_variables = functools.partial(pretrained.load_for_model,
                                       config.model)
  state = steps.create_train_state(model, config.optimizer,
                                   jax.random.PRNGKey(config.seed), image_shape,
                                   load_variables)
  position = Position(epochs_done=0)
  if resuming:
    position, state = checkpoints.restore_newest(state)
    logging.info('Resumed from the checkpoint of %s (after step %d).',
                 _where(position, steps_per_epoch),
                 position.global_step(steps_per_epoch))
  if jax.process_index() == 0:
    records.write_config(workdir, config_dict)
    records.truncate_history(workdir, position.epochs_done)

  writer = records.metric_writer(workdir,
                                 just_logging=jax.process_index() > 0)
  try:
    if not resuming:
      writer.write_hparams(_flat(config_dict))
    p_train, p_eval = steps.pmapped_steps(preprocess)
    state = steps.replicate(state)
    train_fn, compile_seconds = _compile_train_step(p_train, state, dataset,
                                                    config, sharding)
    logging.info('Compiled the train step in %.1f s.', compile_seconds)
    with preemption.StopSignals() as stop:
      loop = _Loop(config, checkpoints, writer, stop, steps_per_epoch)
      state = _train_epochs(loop, train_fn, p_eval, state, dataset, position,
                            workdir, sharding)
    test = evaluate(p_eval, state, dataset.test, config.eval_batch_size,
                    sharding, loader.Loading.from_config(config.data))
    writer.write_scalars(config.num_epochs, {'test_loss': test['loss'],
                                             'test_accuracy': test['accuracy']})
  finally:
    writer.close()
  history = records.read_history(workdir)
  last = history[-1] if history else {}
  results = {
      'model': config.model.name,
      'epochs': config.num_epochs,
      'train_loss': last.get('train_loss'),
      'train_accuracy': last.get('train_accuracy'),
      'val_loss': last.get('val_loss'),
      'val_accuracy': last.get('val_accuracy'),
      'test_loss': test['loss'],
      'test_accuracy': test['accuracy'],
      'num_test_examples': test['count'],
      'total_params': summary.total_params,
      'trainable_params': summary.trainable_params,
  }
  checkpoints.wait()  # Every checkpoint is on disk before the results are.
  if jax.process_index() == 0:
    records.write_results(workdir, results)
  logging.info('Test loss %.4f, accuracy %.4f on %d examples.', test['loss'],
               test['accuracy'], test['count'])
  return results
