"""Per-epoch checkpoints of the train state with orbax-checkpoint.

Checkpoints live in `WORKDIR/checkpoints/<epoch>`; orbax writes each one to
a temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

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

  def wait(self) -> None:
    """Returns once every save in flight is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for saves in flight, then releases the manager's threads."""
    self.wait()
    self._manager.close()
