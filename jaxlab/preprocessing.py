"""Image preprocessing that runs on the device, inside the jitted steps.

Batches arrive as uint8 (four times less to copy to the device than float32).
Training batches are first augmented (report B's "transformations", in
torchvision's order: random horizontal flip, random vertical flip, random
rotation), then every batch becomes float32 in [0, 1] as torchvision's
`ToTensor` makes it, then is optionally normalised per channel.

Each example's random choices come from a key folded from the step's key
and the example's position in the global batch, so they depend neither on
the device count nor on whether the run was resumed.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxlab.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rotate_nearest(image, degrees):
  """Rotates an HWC image counter-clockwise about its centre.

  As torchvision's `RandomRotation` by default: nearest-neighbour sampling,
  same output size, zeros where the rotated image does not reach.
  """
  h, w = image.shape[:2]
  theta = jnp.deg2rad(degrees)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                      jnp.arange(w, dtype=jnp.float32), indexing='ij')
  src_x = jnp.round(cx + (x - cx) * cos - (y - cy) * sin).astype(jnp.int32)
  src_y = jnp.round(cy + (x - cx) * sin + (y - cy) * cos).astype(jnp.int32)
  inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  sampled = image[jnp.clip(src_y, 0, h - 1), jnp.clip(src_x, 0, w - 1)]
  return jnp.where(inside[..., None], sampled, jnp.zeros_like(sampled))


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Augmentation (training only) and normalisation of uint8 NHWC batches.

  mean, std: per-channel normalisation; both empty for none.
  hflip, vflip: flip each training image with probability 0.5.
  rotation: rotate each training image by an angle drawn uniformly from
    [-rotation, rotation] degrees (0: no rotation).
  """
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()
  hflip: bool = False
  vflip: bool = False
  rotation: float = 0.0

  @classmethod
  def from_config(cls, data_config) -> 'Preprocess':
    mean = tuple(data_config.mean)
    std = tuple(data_config.std)
    if len(mean) != len(std) or (mean and len(mean) != data_config.channels):
      raise UserError(f'config data.mean={mean} and data.std={std} must both '
                      f'be empty or both have data.channels='
                      f'{data_config.channels} entries')
    if any(s <= 0 for s in std):
      raise UserError(f'config data.std={std} must be positive')
    if data_config.random_rotation < 0:
      raise UserError(f'config data.random_rotation='
                      f'{data_config.random_rotation} must be >= 0 (degrees)')
    return cls(mean, std, bool(data_config.random_hflip),
               bool(data_config.random_vflip),
               float(data_config.random_rotation))

  @property
  def augments(self) -> bool:
    return self.hflip or self.vflip or self.rotation > 0

  def augment(self, rng, images, example_ids):
    """Augments each image with its own key, `fold_in(rng, example_id)`."""

    def one(image, example_id):
      flip_h, flip_v, angle = jax.random.split(
          jax.random.fold_in(rng, example_id), 3)
      if self.hflip:
        image = jnp.where(jax.random.bernoulli(flip_h), image[:, ::-1], image)
      if self.vflip:
        image = jnp.where(jax.random.bernoulli(flip_v), image[::-1], image)
      if self.rotation:
        image = rotate_nearest(image, jax.random.uniform(
            angle, (), minval=-self.rotation, maxval=self.rotation))
      return image

    return jax.vmap(one)(images, example_ids)

  def __call__(self, images, rng=None, example_ids=None):
    """float32 images; augmented first when given `rng` and `example_ids`."""
    if rng is not None and self.augments:
      images = self.augment(rng, images, example_ids)
    x = images.astype(jnp.float32) / 255.0
    if self.mean:
      x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    return x
