"""Image preprocessing that runs on the device, inside the jitted steps.

Batches arrive as uint8 (four times less to copy to the device than float32)
and become float32 in [0, 1] here, as torchvision's `ToTensor` makes them,
then optionally normalised per channel.
"""

import dataclasses

import jax.numpy as jnp

from jaxlab.errors import UserError


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Per-channel normalisation; empty `mean` and `std` mean none."""
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()

  @classmethod
  def from_config(cls, data_config) -> 'Preprocess':
    mean = tuple(data_config.get('mean', ()) or ())
    std = tuple(data_config.get('std', ()) or ())
    if len(mean) != len(std) or (mean and len(mean) != data_config.channels):
      raise UserError(f'config data.mean={mean} and data.std={std} must both '
                      f'be empty or both have data.channels='
                      f'{data_config.channels} entries')
    if any(s <= 0 for s in std):
      raise UserError(f'config data.std={std} must be positive')
    return cls(mean, std)

  def __call__(self, images):
    x = images.astype(jnp.float32) / 255.0
    if self.mean:
      x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    return x
