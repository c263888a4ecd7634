"""Batches of examples read by index from any split, through grain.

One loader for splits held in memory and splits decoded from disk
(`jaxlab.sources`): grain reads a sequence of index batches in order, each
batch by one call of the split's `read`. For a split on disk, batches are
decoded by `Loading.threads` threads in each of `Loading.workers` worker
processes (none: in the training process), and at most about
`threads + prefetch` batches per process are in flight, so memory is bounded
by the prefetch depth, not by the dataset.

Images that cannot be decoded, `skip_bad_images` off, fail with an error
naming the image, also when a worker finds them mid-epoch. With it on, what
takes their place depends on the use (`_ReadBatch`).
"""

import dataclasses
import logging
import os
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from jaxlab import sources
from jaxlab.errors import UserError


def cpu_count() -> int:
  """The CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Loading:
  """How batches are read: decoding threads per process, worker processes
  (0: decode in the training process), and the batches prefetched."""
  threads: int
  workers: int
  skip_bad_images: bool
  prefetch: int = 2

  @classmethod
  def from_config(cls, data_config) -> 'Loading':
    return cls(threads=data_config.threads or cpu_count(),
               workers=data_config.workers,
               skip_bad_images=data_config.skip_bad_images)


class _ReadBatch:
  """Reads one batch (a dict with `indices`, maybe `mask`) from `split`.

  With skip_bad_images on, an unreadable image's row is, by `on_unreadable`:
  'replace'd by the next readable example of the split (training: the batch
  keeps its size, and the substitute is a pure function of the data, so a
  resumed run reads the same batch), 'mask'ed out (evaluation), or left as
  zeros and 'report'ed for the caller to drop (loading into memory).
  The messages to log come back in the batch's 'skipped'.
  """

  def __init__(self, split, on_unreadable: str, skip_bad_images: bool):
    self.split, self.on_unreadable = split, on_unreadable
    self.skip_bad_images = skip_bad_images

  def __call__(self, element: dict) -> dict:
    indices = element['indices']
    examples = self.split.read(indices)
    batch = {'image': examples.images, 'label': examples.labels}
    if 'mask' in element:
      batch['mask'] = element['mask'].copy()
    skipped, unreadable = [], []
    for row, name, reason in examples.unreadable:
      if not self.skip_bad_images:
        raise sources.unreadable_image(name, reason)
      unreadable.append(row)
      if self.on_unreadable == 'replace':
        substitute = self._next_readable(int(indices[row]))
        batch['image'][row] = substitute.images[0]
        batch['label'][row] = substitute.labels[0]
        skipped.append(f'Skipping unreadable image {name} ({reason}); the '
                       'next readable example takes its place in the batch')
      else:
        if self.on_unreadable == 'mask':
          batch['mask'][row] = 0.0
        skipped.append(f'Skipping unreadable image {name} ({reason})')
    batch['skipped'] = skipped
    batch['unreadable'] = np.asarray(unreadable, np.int64)
    return batch

  def _next_readable(self, index: int) -> sources.Examples:
    n = len(self.split)
    for step in range(1, n):
      examples = self.split.read(np.asarray([(index + step) % n]))
      if not examples.unreadable:
        return examples
    raise UserError(f'no readable image in a split of {n} examples; fix the '
                    'images or the data config')


def _grain_flags_parsed() -> None:
  # grain 0.2.18 reads one of its absl flags unguarded when it starts worker
  # processes; where no absl app parsed the command line (a notebook, a
  # test), its default is what a parse of no flags gives.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def read_batches(split, elements: Sequence[dict], loading: Loading,
                 on_unreadable: str) -> Iterator[dict]:
  """`split`'s batches for `elements` (dicts of `indices`, maybe `mask`), in
  order, prefetched; unreadable images logged as they are skipped."""
  import grain  # pylint: disable=g-import-not-at-top
  decoding = not split.in_memory
  threads = loading.threads if decoding else 1
  ds = grain.MapDataset.source(elements).map(
      _ReadBatch(split, on_unreadable, loading.skip_bad_images))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=threads + loading.prefetch))
  if decoding and loading.workers:
    _grain_flags_parsed()
    # Batches come back through a pipe, not shared memory: grain unlinks
    # shared memory in the background, and some outlived a process that
    # exits right after its last batch (measured: no slower here).
    ds = grain.experimental.WithOptionsIterDataset(
        ds, grain.experimental.DatasetOptions(min_shm_size=2**62))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=loading.workers,
        per_worker_buffer_size=loading.prefetch))
  iterator = iter(ds)
  try:
    for batch in iterator:
      for message in batch.pop('skipped'):
        logging.warning('%s', message)
      yield batch
  finally:
    iterator.close()


def load_into_memory(split, loading: Loading, description: str,
                     progress: bool) -> sources.Split:
  """Decodes every example of `split` once into one preallocated array,
  showing a progress bar with images/s; unreadable images are dropped
  (skip_bad_images) or fail."""
  n = len(split)
  images = np.empty((n,) + split.image_shape, np.uint8)
  labels = np.empty(n, np.int32)
  readable = np.ones(n, bool)
  chunk = 64
  starts = range(0, n, chunk)
  elements = [{'indices': np.arange(s, min(s + chunk, n))} for s in starts]
  bar = tqdm(total=n, unit='img', desc=f'decoding {description}',
             leave=False, dynamic_ncols=True,
             disable=None if progress else True)
  with bar:
    for start, batch in zip(starts,
                            read_batches(split, elements, loading, 'report')):
      k = len(batch['label'])
      images[start:start + k] = batch['image']
      labels[start:start + k] = batch['label']
      readable[start + batch['unreadable']] = False
      bar.update(k)
  kept = int(readable.sum())
  if not kept:
    raise UserError(f'no readable image among the {n} of {description}')
  if kept < n:
    # In place: a boolean index would copy every image once more.
    rows = np.flatnonzero(readable)
    for to, row in enumerate(rows):
      if to != row:
        images[to] = images[row]
    labels = labels[rows]
    images = images[:kept]
  return sources.Split(images, labels)


def to_devices(batches: Iterator[dict], depth: int = 2) -> Iterator[dict]:
  """`batches` ([local devices, per device, ...] numpy arrays) put on this
  process's devices `depth` batches ahead, sharded over the leading axis."""
  import collections  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), ('devices',)),
      jax.sharding.PartitionSpec('devices'))
  queue = collections.deque()
  for batch in batches:
    queue.append(jax.device_put(batch, sharding))
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
