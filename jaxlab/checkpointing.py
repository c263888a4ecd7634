"""Per-epoch checkpoints of the train state with orbax-checkpoint.

Checkpoints live in `WORKDIR/checkpoints/<epoch>`; orbax writes each one to
a temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact.
"""

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

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
    self._manager = ocp.CheckpointManager(
        # orbax writes arrays only under an absolute path.
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every_epochs, max_to_keep=keep, create=True))

  def latest_epoch(self) -> int | None:
    """The epoch of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, epoch: int, state: TrainState, force: bool = False) -> None:
    """Saves `state` (not replicated) as of the end of `epoch`, in the
    background; `force` saves even off the `every_epochs` interval."""
    sharding = _first_devices_sharding()
    fields = {k: jax.tree.map(lambda x: _to_global(x, sharding),
                              getattr(state, k)) for k in _SAVED_FIELDS}
    self._manager.save(epoch, args=ocp.args.StandardSave(fields), force=force)

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
          _move_aside(os.path.join(directory, str(epoch)),
                      f'{directory}_unreadable')
        self._manager.reload()
    raise UserError(
        f'no checkpoint in {directory} restores ({"; ".join(failures)}); they '
        f'are moved to {directory}_unreadable; run again to start from '
        'scratch, or use another --workdir')

  def wait(self) -> None:
    """Returns once every save in flight is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for saves in flight, then releases the manager's threads."""
    self.wait()
    self._manager.close()
