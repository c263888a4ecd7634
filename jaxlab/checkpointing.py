"""Checkpoints of the train state with orbax-checkpoint, at epoch ends and
mid-epoch.

Checkpoints live in `WORKDIR/checkpoints/<step>`, named by the number of
train steps done, with their `Position` in training (epochs done, steps
into the next, and that epoch's train metrics so far) in orbax's metadata;
older runs' checkpoints, named by epoch, restore as epoch ends. Orbax writes
each one to
a temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact. Saves run in the background; a save
that fails (a full disk, a refused write) is reported as `WriteFailed` by
the next `save` or `wait`, its half-written folder is removed, and every
earlier checkpoint stays as it was.
"""

import dataclasses
import gc
import glob
import json
import os
import shutil

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlab import storage
from jaxlab.errors import UserError
from jaxlab.steps import TrainState

_SAVED_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'rng')


def _first_devices_sharding() -> jax.sharding.NamedSharding:
  """Replicated over each process's first device. Orbax saves only global
  arrays in a multi-process run: the copies that every process holds become
  one array, which process 0 writes."""
  devices = [jax.local_devices(process_index=p)[0]
             for p in range(jax.process_count())]
  return jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices),
                                                      ('process',)),
                                    jax.sharding.PartitionSpec())


def _to_global(x: jax.Array, sharding) -> jax.Array:
  return jax.make_array_from_single_device_arrays(
      x.shape, sharding, [jax.device_put(x, jax.local_devices()[0])])


def _move_aside(path: str, folder: str) -> None:
  """Moves `path` into `folder`, under a name not taken there yet."""
  os.makedirs(folder, exist_ok=True)
  name, n = os.path.basename(path), 1
  target = os.path.join(folder, name)
  while os.path.exists(target):
    target = os.path.join(folder, f'{name}.{n}')
    n += 1
  os.replace(path, target)


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a checkpoint stands: `epochs_done` whole epochs, then
  `steps_into_epoch` steps of the next one, whose train metrics so far are
  `epoch_metrics` (a flax state dict of floats; None at an epoch's end)."""
  epochs_done: int
  steps_into_epoch: int = 0
  epoch_metrics: dict | None = None

  def global_step(self, steps_per_epoch: int) -> int:
    """The train steps done at this position."""
    return self.epochs_done * steps_per_epoch + self.steps_into_epoch


class Checkpoints:
  """Saves and restores a `TrainState` with its `Position`, keeping the
  newest `keep`."""

  def __init__(self, directory: str, keep: int = 3):
    # orbax writes arrays only under an absolute path.
    directory = os.path.abspath(directory)
    try:
      self._manager = ocp.CheckpointManager(
          directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    except Exception as e:  # pylint: disable=broad-except
      if storage.is_write_error(e):
        raise storage.failure(directory, e, None) from None
      raise
    self._in_flight = None  # (step, bytes) of the save in the background.
    self._failures = 0

  def position(self, step: int) -> Position:
    """The position of the checkpoint of `step`, read from its metadata."""
    custom = self._manager.metadata(step).custom_metadata or {}
    if 'epochs_done' not in custom:
      # Orbax reads a cut metadata file as empty: only one that parses is a
      # checkpoint saved by epoch, before positions were.
      with open(os.path.join(self._path(step), '_CHECKPOINT_METADATA')) as f:
        json.load(f)
      return Position(epochs_done=step)
    return Position(custom['epochs_done'], custom['steps_into_epoch'],
                    custom.get('epoch_metrics'))

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints, readable or not."""
    return sorted(self._manager.all_steps())

  def latest_position(self) -> Position | None:
    """The position of the newest checkpoint whose metadata reads, or None;
    without reading any array."""
    for step in reversed(self.steps()):
      try:
        return self.position(step)
      except Exception:  # pylint: disable=broad-except
        continue  # restore_newest names it, and moves it aside.
    return None

  def _path(self, step: int) -> str:
    return os.path.join(str(self._manager.directory), str(step))

  def _failed(self, step: int, needed: int, error: Exception
              ) -> storage.WriteFailed:
    """Cleans up after the save of `step` failed; the error to raise."""
    if jax.process_index() == 0:
      # The half-written folder holds space the next run needs; orbax
      # never counts it as a checkpoint.
      for partial in glob.glob(f'{self._path(step)}.orbax-checkpoint-tmp*'):
        shutil.rmtree(partial, ignore_errors=True)
    self._failures += 1
    return storage.failure(self._path(step), error, needed)

  def _finish_in_flight(self) -> None:
    """Waits for the background save; a failure of it as WriteFailed."""
    in_flight, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if in_flight is None or not storage.is_write_error(e):
        raise
      raise self._failed(*in_flight, e) from None

  def save(self, step: int, state: TrainState, position: Position) -> None:
    """Saves `state` (not replicated) after `step` train steps, at
    `position`, in the background."""
    self._finish_in_flight()
    sharding = _first_devices_sharding()
    fields = {k: jax.tree.map(lambda x: _to_global(x, sharding),
                              getattr(state, k)) for k in _SAVED_FIELDS}
    needed = sum(x.nbytes for x in jax.tree.leaves(fields))
    try:
      self._manager.save(step, args=ocp.args.StandardSave(fields), force=True,
                         custom_metadata=dataclasses.asdict(position))
    except Exception as e:  # pylint: disable=broad-except
      if not storage.is_write_error(e):
        raise
      raise self._failed(step, needed, e) from None
    self._in_flight = (step, needed)

  def restore(self, step: int, like: TrainState) -> tuple[Position,
                                                          TrainState]:
    """The position and state saved after `step` train steps, the state
    with the structure and statics of `like`."""
    sharding = _first_devices_sharding()
    target = {k: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x),
                                       sharding=sharding),
        getattr(like, k)) for k in _SAVED_FIELDS}
    fields = self._manager.restore(step,
                                   args=ocp.args.StandardRestore(target))
    return self.position(step), like.replace(
        **jax.tree.map(lambda x: x.addressable_data(0), fields))

  def restore_newest(self, like: TrainState) -> tuple[Position, TrainState]:
    """(position, state) of the newest checkpoint that restores.

    A checkpoint that does not (missing or truncated files, another
    structure) is skipped with a warning naming it and why, and moved aside
    to `<checkpoints>_unreadable/<step>`, kept for inspection, so that the
    run saves that step again. If none restores, a UserError says so.
    """
    directory = str(self._manager.directory)
    failures = []
    for step in reversed(self.steps()):
      try:
        return self.restore(step, like)
      except Exception as e:  # pylint: disable=broad-except
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        failures.append(f'{step}: {reason}')
        logging.warning('Checkpoint %s does not restore (%s); trying the one '
                        'before it.', self._path(step), reason)
        if jax.process_index() == 0:
          with storage.writing(f'{directory}_unreadable', None):
            _move_aside(self._path(step), f'{directory}_unreadable')
        self._manager.reload()
    raise UserError(
        f'no checkpoint in {directory} restores ({"; ".join(failures)}); they '
        f'are moved to {directory}_unreadable; run again to start from '
        'scratch, or use another --workdir')

  def wait(self) -> None:
    """Returns once every save in flight is complete on disk; raises
    WriteFailed if one could not be written."""
    self._finish_in_flight()

  def close(self) -> None:
    """Waits for saves in flight, then releases the manager's threads (also
    after a failed save, whose error `save` or `wait` has raised)."""
    try:
      self.wait()
    finally:
      self._manager.close()
      if self._failures:
        # The failed save's coroutines and futures end now, while logging
        # still works, not as tracebacks when Python exits.
        gc.collect()
