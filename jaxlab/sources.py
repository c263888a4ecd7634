"""Splits read by example index: held in memory, or decoded from disk on demand.

Each split has `len()`, `image_shape` and `read(indices)`, which returns the
examples at `indices` as uint8 images [k, H, W, C] and int32 labels [k],
plus the rows it could not decode. The loader (`jaxlab.loader`) reads
batches through `read` whatever the split, so a split held in memory and the
same split streamed from disk give the same batches.

Images are decoded and resized with PIL (bilinear, as torchvision's `Resize`
does on PIL images), here and nowhere else.
"""

import dataclasses
import io
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from jaxlab.errors import UserError

PIL_MODES = {1: 'L', 3: 'RGB', 4: 'RGBA'}
# What PIL raises for a file that is not a whole, decodable image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_array(image: Image.Image, size: int, channels: int,
             out: np.ndarray | None = None) -> np.ndarray:
  """`image` as a uint8 array [size, size, channels], written into `out`
  when given."""
  image = image.convert(PIL_MODES[channels])
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  array = np.asarray(image, dtype=np.uint8).reshape(size, size, channels)
  if out is None:
    return array
  out[...] = array
  return out


def decode(file, size: int, channels: int,
           out: np.ndarray | None = None) -> np.ndarray:
  """Decodes an image file (a path or a file object) and resizes it."""
  with Image.open(file) as image:
    image.load()  # Decodes fully, so truncated files fail here.
    return to_array(image, size, channels, out)


def unreadable_image(name: str, reason) -> UserError:
  """The error for an image that cannot be decoded, skip_bad_images off."""
  return UserError(f'cannot read image {name} ({reason}); fix or remove it, '
                   'or set --config.data.skip_bad_images=True to skip '
                   'unreadable images')


class Examples(NamedTuple):
  """Examples read by index; `unreadable` lists (row, image name, reason) for
  the rows that could not be decoded (their images are zeros)."""
  images: np.ndarray
  labels: np.ndarray
  unreadable: tuple = ()


@dataclasses.dataclass
class Split:
  """A split held in memory: images [N, H, W, C] uint8 and labels [N] int32."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple:
    return self.images.shape[1:]

  in_memory = True

  def read(self, indices: Sequence[int]) -> Examples:
    return Examples(self.images[indices], self.labels[indices])

  def decoded_bytes(self) -> int:
    return self.images.nbytes

  def subset(self, indices: np.ndarray) -> 'Split':
    return Split(self.images[indices], self.labels[indices])


class _Decoded:
  """A split decoded from disk on each read, at `size` x `size` x `channels`."""
  size: int
  channels: int
  in_memory = False

  @property
  def image_shape(self) -> tuple:
    return (self.size, self.size, self.channels)

  def decoded_bytes(self) -> int:
    return len(self) * int(np.prod(self.image_shape))

  def _decode_into(self, files, names) -> tuple[np.ndarray, list]:
    images = np.empty((len(names),) + self.image_shape, np.uint8)
    unreadable = []
    for row, (file, name) in enumerate(zip(files, names)):
      try:
        decode(file, self.size, self.channels, out=images[row])
      except DECODE_ERRORS as e:
        images[row] = 0
        unreadable.append((row, name, str(e)))
    return images, unreadable


@dataclasses.dataclass
class ImageFiles(_Decoded):
  """Image files with their labels, decoded when read."""
  paths: np.ndarray   # [N] str
  labels: np.ndarray  # [N] int32
  size: int
  channels: int

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices: np.ndarray) -> 'ImageFiles':
    return dataclasses.replace(self, paths=self.paths[indices],
                               labels=self.labels[indices])

  def read(self, indices: Sequence[int]) -> Examples:
    paths = [str(p) for p in self.paths[indices]]
    images, unreadable = self._decode_into(paths, paths)
    return Examples(images, self.labels[indices], tuple(unreadable))


@dataclasses.dataclass
class EncodedImages(_Decoded):
  """Encoded images (PNG or JPEG bytes) held in memory with their names and
  labels, decoded when read."""
  blobs: np.ndarray   # [N] bytes objects
  names: np.ndarray   # [N] str
  labels: np.ndarray  # [N] int32
  size: int
  channels: int

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices: np.ndarray) -> 'EncodedImages':
    return dataclasses.replace(self, blobs=self.blobs[indices],
                               names=self.names[indices],
                               labels=self.labels[indices])

  def read(self, indices: Sequence[int]) -> Examples:
    images, unreadable = self._decode_into(
        (io.BytesIO(b) for b in self.blobs[indices]),
        [str(n) for n in self.names[indices]])
    return Examples(images, self.labels[indices], tuple(unreadable))


@dataclasses.dataclass
class TfdsRecords(_Decoded):
  """The examples `indices` of a split of a tensorflow-datasets dataset in
  ArrayRecord format, read by random access (`tfds.data_source`) and decoded
  with PIL from the stored image bytes."""
  name: str
  split: str
  data_dir: str | None
  image_key: str
  label_key: str
  indices: np.ndarray  # Record numbers in the tfds split.
  size: int
  channels: int

  def __len__(self) -> int:
    return len(self.indices)

  def subset(self, indices: np.ndarray) -> 'TfdsRecords':
    return dataclasses.replace(self, indices=self.indices[indices])

  def __getstate__(self):
    # Each process opens its own reader: the open files don't pickle.
    return {k: v for k, v in self.__dict__.items() if k != '_source'}

  def _records(self):
    source = self.__dict__.get('_source')
    if source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      builder = tfds.builder(self.name, data_dir=self.data_dir, try_gcs=False)
      source = builder.as_data_source(
          split=self.split,
          decoders={self.image_key: tfds.decode.SkipDecoding()})
      self.__dict__['_source'] = source
    return source

  def read(self, indices: Sequence[int]) -> Examples:
    records = self._records().__getitems__(
        [int(i) for i in self.indices[indices]])
    names = [f'{self.name}/{self.split}[{int(i)}]'
             for i in self.indices[indices]]
    images, unreadable = self._decode_into(
        (io.BytesIO(r[self.image_key]) for r in records), names)
    labels = np.asarray([r[self.label_key] for r in records], np.int32)
    return Examples(images, labels, tuple(unreadable))
