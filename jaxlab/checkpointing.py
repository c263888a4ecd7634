"""Per-epoch checkpoints of the train state with orbax-checkpoint.

Checkpoints live in `WORKDIR/checkpoints/<epoch>`; orbax writes each one to
a temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact.
"""

import jax
import orbax.checkpoint as ocp

from jaxlab.steps import TrainState

_SAVED_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'rng')


class Checkpoints:
  """Saves and restores a `TrainState` once per epoch (or every N epochs)."""

  def __init__(self, directory: str, every_epochs: int = 1, keep: int = 3):
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every_epochs, max_to_keep=keep, create=True))

  def latest_epoch(self) -> int | None:
    """The epoch of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, epoch: int, state: TrainState, force: bool = False) -> None:
    """Saves `state` (not replicated) as of the end of `epoch`, in the
    background; `force` saves even off the `every_epochs` interval."""
    fields = {k: getattr(state, k) for k in _SAVED_FIELDS}
    self._manager.save(epoch, args=ocp.args.StandardSave(fields), force=force)

  def restore(self, epoch: int, like: TrainState) -> TrainState:
    """The state saved at `epoch`, with the structure and statics of `like`."""
    target = {k: jax.tree.map(ocp.utils.to_shape_dtype_struct, getattr(like, k))
              for k in _SAVED_FIELDS}
    fields = self._manager.restore(epoch,
                                   args=ocp.args.StandardRestore(target))
    return like.replace(**fields)

  def wait(self) -> None:
    """Returns once every save in flight is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for saves in flight, then releases the manager's threads."""
    self.wait()
    self._manager.close()
