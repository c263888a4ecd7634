"""Per-epoch checkpoints of the train state with orbax-checkpoint.

Checkpoints live in `WORKDIR/checkpoints/<epoch>`; orbax writes each one to
a temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact. Saves run in the background; a save
that fails (a full disk, a refused write) is reported as `WriteFailed` by
the next `save` or `wait`, its half-written folder is removed, and every
earlier checkpoint stays as it was.
"""

import gc
import glob
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


class Checkpoints:
  """Saves and restores a `TrainState` once per epoch (or every N epochs)."""

  def __init__(self, directory: str, every_epochs: int = 1, keep: int = 3):
    # orbax writes arrays only under an absolute path.
    directory = os.path.abspath(directory)
    try:
      self._manager = ocp.CheckpointManager(
          directory,
          options=ocp.CheckpointManagerOptions(
              save_interval_steps=every_epochs, max_to_keep=keep,
              create=True))
    except Exception as e:  # pylint: disable=broad-except
      if storage.is_write_error(e):
        raise storage.failure(directory, e, None) from None
      raise
    self._in_flight = None  # (epoch, bytes) of the save in the background.
    self._failures = 0

  def latest_epoch(self) -> int | None:
    """The epoch of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def _path(self, epoch: int) -> str:
    return os.path.join(str(self._manager.directory), str(epoch))

  def _failed(self, epoch: int, needed: int, error: Exception
              ) -> storage.WriteFailed:
    """Cleans up after the save of `epoch` failed; the error to raise."""
    if jax.process_index() == 0:
      # The half-written folder holds space the next run needs; orbax
      # never counts it as a checkpoint.
      for partial in glob.glob(f'{self._path(epoch)}.orbax-checkpoint-tmp*'):
        shutil.rmtree(partial, ignore_errors=True)
    self._failures += 1
    return storage.failure(self._path(epoch), error, needed)

  def _finish_in_flight(self) -> None:
    """Waits for the background save; a failure of it as WriteFailed."""
    in_flight, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if in_flight is None or not storage.is_write_error(e):
        raise
      raise self._failed(*in_flight, e) from None

  def save(self, epoch: int, state: TrainState, force: bool = False) -> None:
    """Saves `state` (not replicated) as of the end of `epoch`, in the
    background; `force` saves even off the `every_epochs` interval."""
    self._finish_in_flight()
    sharding = _first_devices_sharding()
    fields = {k: jax.tree.map(lambda x: _to_global(x, sharding),
                              getattr(state, k)) for k in _SAVED_FIELDS}
    needed = sum(x.nbytes for x in jax.tree.leaves(fields))
    try:
      saving = self._manager.save(epoch, args=ocp.args.StandardSave(fields),
                                  force=force)
    except Exception as e:  # pylint: disable=broad-except
      if not storage.is_write_error(e):
        raise
      raise self._failed(epoch, needed, e) from None
    if saving:
      self._in_flight = (epoch, needed)

  def restore(self, epoch: int, like: TrainState) -> TrainState:
    """The state saved at `epoch`, with the structure and statics of `like`."""
    sharding = _first_devices_sharding()
    target = {k: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x),
                                       sharding=sharding),
        getattr(like, k)) for k in _SAVED_FIELDS}
    fields = self._manager.restore(epoch,
                                   args=ocp.args.StandardRestore(target))
    return like.replace(**jax.tree.map(lambda x: x.addressable_data(0),
                                       fields))

  def restore_newest(self, like: TrainState) -> tuple[int, TrainState]:
    """(epoch, state) of the newest checkpoint that restores.

    A checkpoint that does not (missing or truncated files, another
    structure) is skipped with a warning naming it and why, and moved aside
    to `<checkpoints>_unreadable/<epoch>`, kept for inspection, so that the
    run saves that epoch again. If none restores, a UserError says so.
    """
    directory = str(self._manager.directory)
    failures = []
    for epoch in sorted(self._manager.all_steps(), reverse=True):
      try:
        return epoch, self.restore(epoch, like)
      except Exception as e:  # pylint: disable=broad-except
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        failures.append(f'epoch {epoch}: {reason}')
        logging.warning('Checkpoint %s does not restore (%s); trying the one '
                        'before it.', os.path.join(directory, str(epoch)),
                        reason)
        if jax.process_index() == 0:
          with storage.writing(f'{directory}_unreadable', None):
            _move_aside(os.path.join(directory, str(epoch)),
                        f'{directory}_unreadable')
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
