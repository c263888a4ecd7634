"""The dataset a config names, as splits in memory or streamed from disk, and
the batches fed to devices.

Three sources, chosen by the config's `data` section:
  * `data.path` empty and `data.tfds_name` empty: scikit-learn's handwritten
    digits (1,797 real 8x8 images, 10 classes, shipped inside scikit-learn),
    rendered at `data.image_size` with `data.channels` channels;
  * `data.path`: an image folder, one sub-folder per class, either unsplit
    (split by a seeded shuffle, report A) or with `train/` and `test/`
    sub-folders (report B; `test/` is also the validation split unless a
    `val/` or `validation/` folder exists);
  * `data.tfds_name`: a tensorflow-datasets dataset prepared in
    `data.data_dir`, downloaded only when `data.download` is true.

`data.cache` says where the images live during training: `memory` decodes
every image once into uint8 arrays; `stream` decodes each batch from disk as
it is needed (folders, and tfds datasets stored as ArrayRecord); `auto` takes
memory when the decoded splits fit `data.memory_budget_gb`, else stream.
Both feed the same loader (`jaxlab.loader`) in the same order, so they give
the same batches. Conversion to float and any normalisation happen on the
device (see `jaxlab.preprocessing`).
"""

import dataclasses
import logging
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from jaxlab import downloads
from jaxlab import loader
from jaxlab import sources
from jaxlab.errors import UserError
from jaxlab.sources import Split

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
CACHES = ('auto', 'memory', 'stream')


@dataclasses.dataclass
class Dataset:
  train: Split
  val: Split
  test: Split
  class_names: list[str]
  source: str

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _tf():
  """TensorFlow, imported on first use and kept off any GPU."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  return tf


def check_data_config(data_config) -> None:
  """The `data` section's checks that need no data (one-line errors)."""
  channels = data_config.channels
  if channels not in sources.PIL_MODES:
    raise UserError(f'config data.channels={channels!r} is not supported; '
                    'use 1 (grey), 3 (RGB) or 4 (RGBA)')
  size = data_config.image_size
  if not isinstance(size, int) or isinstance(size, bool) or size < 8:
    raise UserError(f'config data.image_size={size!r} must be an integer of '
                    'at least 8')
  if data_config.path and data_config.tfds_name:
    raise UserError('config data.path and data.tfds_name are both set; set '
                    'one (an image folder or a tfds dataset), or neither for '
                    'the offline digits')
  _check_split(data_config.split)
  if data_config.cache not in CACHES:
    raise UserError(f'config data.cache={data_config.cache!r} must be one of '
                    f'{", ".join(CACHES)}')
  budget = data_config.memory_budget_gb
  if (not isinstance(budget, (int, float)) or isinstance(budget, bool) or
      budget < 0):
    raise UserError(f'config data.memory_budget_gb={budget!r} must be a number '
                    'of GB >= 0 (0: half of this machine\'s memory)')
  for key in ('workers', 'threads'):
    value = data_config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise UserError(f'config data.{key}={value!r} must be an integer >= 0')


def _check_split(fractions: Sequence[float]) -> None:
  fractions = tuple(fractions)
  if (len(fractions) != 3 or
      not all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in fractions)
      or abs(sum(fractions) - 1) > 1e-6 or fractions[0] == 0):
    raise UserError(f'config data.split={fractions} must be three fractions '
                    'in [0, 1] (train, val, test) adding up to 1, train above '
                    '0')


def load_dataset(data_config, progress: bool = False) -> Dataset:
  """Loads the dataset that the config's `data` section names, in memory or
  streamed as `data.cache` says (`progress`: show the decoding's bar)."""
  check_data_config(data_config)
  if not (data_config.path or data_config.tfds_name):
    return _load_digits(data_config)
  if data_config.path:
    splits, class_names, source = _folder_splits(data_config)
  else:
    splits, class_names, source = _tfds_splits(data_config)
  cache = _choose_cache(data_config, splits, source)
  if cache == 'memory':
    loading = loader.Loading.from_config(data_config)
    in_memory = {}
    for name, split in splits.items():
      if id(split) not in in_memory:
        in_memory[id(split)] = loader.load_into_memory(
            split, loading, f'the {name} split of {source}', progress)
    splits = {name: in_memory[id(split)] for name, split in splits.items()}
  elif data_config.tfds_name and not isinstance(splits['train'],
                                                sources.TfdsRecords):
    raise UserError(
        f'{source} is stored as tfrecord, which cannot be read by index, and '
        f'data.cache={data_config.cache!r} streams it; prepare it as '
        f'ArrayRecord (`tfds build {data_config.tfds_name} '
        '--file_format=array_record`), or set --config.data.cache=memory')
  return Dataset(splits['train'], splits['val'], splits['test'], class_names,
                 source=f'{source}, {cache}')


def memory_budget_bytes(data_config) -> int:
  """`data.memory_budget_gb` in bytes; 0: half of this machine's memory."""
  if data_config.memory_budget_gb:
    return int(data_config.memory_budget_gb * 2**30)
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2


def _choose_cache(data_config, splits: dict, source: str) -> str:
  """'memory' or 'stream', as `data.cache` says; `auto` is logged."""
  if data_config.cache != 'auto':
    return data_config.cache
  unique = {id(s): s for s in splits.values()}.values()
  needed = sum(s.decoded_bytes() for s in unique)
  budget = memory_budget_bytes(data_config)
  cache = 'memory' if needed <= budget else 'stream'
  logging.info('Data: %s decoded at %dx%d needs %.2f GB, %s the memory budget '
               'of %.2f GB (data.memory_budget_gb): %s (data.cache=auto).',
               source, data_config.image_size, data_config.image_size,
               needed / 2**30, 'within' if cache == 'memory' else 'over',
               budget / 2**30,
               'decoded into memory' if cache == 'memory' else
               'streamed from disk')
  return cache


def _split_indices(n: int, fractions: Sequence[float], seed: int,
                   where: str) -> list[np.ndarray]:
  """A seeded shuffle of range(n) cut into train/val/test by `fractions`
  (checked by `check_data_config`)."""
  n_val = int(round(fractions[1] * n))
  n_test = int(round(fractions[2] * n))
  n_train = n - n_val - n_test
  if min(n_train, n_val, n_test) < 1:
    raise UserError(f'{where} has only {n} images, too few for a '
                    f'{"/".join(str(f) for f in fractions)} split; '
                    'every split needs at least one image')
  order = np.random.default_rng(seed).permutation(n)
  return [order[:n_train], order[n_train:n_train + n_val],
          order[n_train + n_val:]]


def _split(whole, data_config, where: str) -> dict:
  """An unsplit source cut into train, val and test by `data.split`."""
  parts = _split_indices(len(whole), data_config.split,
                         data_config.split_seed, where)
  return dict(zip(('train', 'val', 'test'),
                  (whole.subset(idx) for idx in parts)))


def _load_digits(data_config) -> Dataset:
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  size, channels = data_config.image_size, data_config.channels
  images = np.stack([
      sources.to_array(Image.fromarray(np.uint8(np.round(d * 255 / 16))),
                       size, channels) for d in digits.images])
  whole = Split(images, digits.target.astype(np.int32))
  splits = _split(whole, data_config, 'the digits dataset')
  return Dataset(splits['train'], splits['val'], splits['test'],
                 [str(i) for i in range(10)],
                 source='scikit-learn digits, memory')


# --------------------------------------------------------------------------
# Image folders.


def _class_folders(root: str, where: str) -> list[str]:
  names = sorted(e.name for e in os.scandir(root)
                 if e.is_dir() and not e.name.startswith('.'))
  if not names:
    raise UserError(f'{where}={root} has no class sub-folders; it should hold '
                    'one sub-folder of PNG or JPEG images per class')
  return names


def _list_images(folder: str) -> list[str]:
  files = sorted(e.path for e in os.scandir(folder)
                 if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise UserError(f'class folder {folder} has no PNG or JPEG images; add '
                    'images or remove the folder')
  return files


def _class_tree(root: str, class_names: list[str],
                data_config) -> sources.ImageFiles:
  """Every image of `root/<class>/`, labelled by the class's index in
  `class_names`; a class without a folder under `root` has no images here."""
  paths, labels = [], []
  for label, name in enumerate(class_names):
    if not os.path.isdir(os.path.join(root, name)):
      continue
    files = _list_images(os.path.join(root, name))
    paths += files
    labels += [label] * len(files)
  return sources.ImageFiles(np.asarray(paths), np.asarray(labels, np.int32),
                            data_config.image_size, data_config.channels)


def _folder_layout(root: str) -> tuple[set[str], bool]:
  """The sub-folders of `data.path`, and whether it holds train/ and test/."""
  if not os.path.isdir(root):
    raise UserError(f'config data.path={root} is not a folder; point it at a '
                    'folder with one sub-folder of images per class, or at '
                    'one with train/ and test/ sub-folders')
  subdirs = set(_class_folders(root, 'config data.path'))
  return subdirs, {'train', 'test'} <= subdirs


def folder_images(root: str, data_config) -> sources.ImageFiles:
  """Every image of an unsplit folder (one sub-folder per class), to be
  decoded at the config's size as it is read."""
  return _class_tree(root, _class_folders(root, 'config data.path'),
                     data_config)


def _folder_splits(data_config) -> tuple[dict, list[str], str]:
  root = data_config.path
  subdirs, presplit = _folder_layout(root)
  if not presplit:
    class_names = sorted(subdirs)
    whole = folder_images(root, data_config)
    return (_split(whole, data_config, f'data.path={root}'), class_names,
            f'image folder {root}')
  train_dir = os.path.join(root, 'train')
  class_names = _class_folders(train_dir, 'train folder')
  val_name = next((v for v in ('val', 'validation') if v in subdirs), 'test')
  splits = {}
  for split_name in ('train', 'test', val_name):
    if split_name in splits:
      continue
    split_dir = os.path.join(root, split_name)
    extra = set(_class_folders(split_dir, f'{split_name} folder')) - set(
        class_names)
    if extra:
      raise UserError(f'{split_dir} has class folder(s) {sorted(extra)} that '
                      f'{train_dir} lacks; both must hold the same classes')
    splits[split_name] = _class_tree(split_dir, class_names, data_config)
  return ({'train': splits['train'], 'val': splits[val_name],
           'test': splits['test']}, class_names,
          f'image folder {root} (pre-split)')


# --------------------------------------------------------------------------
# tensorflow-datasets.


def _tfds_builder(data_config):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir = data_config.tfds_name, data_config.data_dir or None
  try:
    return tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'config data.tfds_name={name!r} is not a '
                    'tensorflow-datasets dataset; see '
                    'tfds.list_builders()') from None


def _tfds_splits(data_config) -> tuple[dict, list[str], str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir = data_config.tfds_name, data_config.data_dir or None
  builder = _tfds_builder(data_config)
  if not builder.is_prepared():
    where = data_dir or tfds.core.constants.DATA_DIR
    if not data_config.download:
      raise UserError(
          f'tfds dataset {name!r} is not prepared in {where}; prepare it on a '
          f'machine with network (`tfds build {name} --data_dir {where}`) and '
          'copy it there, or set --config.data.download=True')
    if not downloads.network_reachable('https://storage.googleapis.com'):
      raise UserError(f'tfds dataset {name!r} is not in {where} and there is '
                      'no network to download it; prepare it elsewhere with '
                      f'`tfds build {name} --data_dir {where}` and copy it')
    builder.download_and_prepare()
  features = builder.info.features
  image_key, label_key = data_config.image_key, data_config.label_key
  for key in (image_key, label_key):
    if key not in features:
      raise UserError(f'tfds dataset {name!r} has no feature {key!r}; its '
                      f'features are {sorted(features.keys())}')
  if not hasattr(features[label_key], 'num_classes'):
    raise UserError(f'config data.label_key={label_key!r} of tfds dataset '
                    f'{name!r} is not a class label')
  random_access = (builder.info.file_format ==
                   tfds.core.file_adapters.FileFormat.ARRAY_RECORD)

  def split(split_name):
    n = builder.info.splits[split_name].num_examples
    if random_access:
      return sources.TfdsRecords(name, split_name, data_dir, image_key,
                                 label_key, np.arange(n),
                                 data_config.image_size, data_config.channels)
    return _tfrecord_split(builder, split_name, data_config)

  available = set(builder.info.splits.keys())
  if 'train' not in available:
    raise UserError(f'tfds dataset {name!r} has no train split (it has '
                    f'{sorted(available)})')
  held_out = [s for s in ('validation', 'test') if s in available]
  if held_out:
    splits = {'train': split('train'), 'val': split(held_out[0])}
    splits['test'] = (split(held_out[-1]) if len(held_out) > 1 else
                      splits['val'])
  else:
    splits = _split(split('train'), data_config, f'tfds dataset {name!r}')
  class_names = list(getattr(features[label_key], 'names', None) or
                     [str(i) for i in range(features[label_key].num_classes)])
  return splits, class_names, f'tfds {name}'


def _tfrecord_split(builder, split_name: str,
                    data_config) -> sources.EncodedImages:
  """A split stored as tfrecord (no random access), read in order once with
  its images still encoded; they are decoded as any split's are."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _tf()
  image_key, label_key = data_config.image_key, data_config.label_key
  blobs, labels = [], []
  for example in tfds.as_numpy(builder.as_dataset(
      split=split_name, decoders={image_key: tfds.decode.SkipDecoding()})):
    blobs.append(example[image_key])
    labels.append(example[label_key])
  names = np.asarray([f'{builder.name}/{split_name}[{i}]'
                      for i in range(len(blobs))])
  return sources.EncodedImages(np.asarray(blobs, object), names,
                               np.asarray(labels, np.int32),
                               data_config.image_size, data_config.channels)


# --------------------------------------------------------------------------
# Batches.


@dataclasses.dataclass(frozen=True)
class Sharding:
  """How a global batch is divided: over processes, then local devices."""
  process_index: int
  process_count: int
  local_device_count: int

  @classmethod
  def current(cls) -> 'Sharding':
    import jax  # pylint: disable=g-import-not-at-top
    return cls(jax.process_index(), jax.process_count(),
               jax.local_device_count())

  def local_batch_size(self, global_batch_size: int, key: str) -> int:
    devices = self.process_count * self.local_device_count
    if global_batch_size < 1 or global_batch_size % devices:
      raise UserError(f'config {key}={global_batch_size} cannot be split '
                      f'evenly over {devices} devices; use a multiple of '
                      f'{devices}')
    return global_batch_size // self.process_count


_DEFAULT_LOADING = loader.Loading(threads=0, workers=0, skip_bad_images=False)


def _batches(split, elements: list[dict], sharding: Sharding,
             loading: loader.Loading | None, on_unreadable: str):
  """Reads [local_batch] index batches into device-shaped numpy batches."""
  loading = loading or dataclasses.replace(_DEFAULT_LOADING,
                                           threads=loader.cpu_count())
  n_dev = sharding.local_device_count
  for batch in loader.read_batches(split, elements, loading, on_unreadable):
    del batch['unreadable']
    yield {k: v.reshape((n_dev, -1) + v.shape[1:]) for k, v in batch.items()}


def train_batches(split, global_batch_size: int, seed: int, epoch: int,
                  sharding: Sharding, first_step: int = 0,
                  loading: loader.Loading | None = None) -> Iterator[dict]:
  """This process's share of each training batch of one epoch, from the
  batch after `first_step` steps on.

  The order is a permutation drawn from (seed, epoch) alone, so a resumed run
  sees the same batches as an uninterrupted one, also from mid-epoch. The
  last incomplete batch of an epoch is dropped. Batches are dicts of numpy
  arrays shaped [local_devices, per_device_batch, ...].
  """
  local = sharding.local_batch_size(global_batch_size, 'batch_size')
  steps = len(split) // global_batch_size
  order = np.random.default_rng([seed, epoch]).permutation(len(split))
  order = order[:steps * global_batch_size].reshape(steps, global_batch_size)
  start = sharding.process_index * local
  elements = [{'indices': row}
              for row in order[first_step:, start:start + local]]
  yield from _batches(split, elements, sharding, loading, 'replace')


def steps_per_epoch(split, global_batch_size: int) -> int:
  return len(split) // global_batch_size


def eval_batches(split, global_batch_size: int, sharding: Sharding,
                 loading: loader.Loading | None = None) -> Iterator[dict]:
  """Batches that cover every example of `split` exactly once.

  Examples are dealt to processes round-robin; each process pads its share
  to whole batches by repeating example 0 and marks real examples in
  `mask` (1.0) and padding (0.0). Every process runs the same number of
  batches, as the collective eval step requires. An unreadable image skipped
  (skip_bad_images) is masked out.
  """
  local = sharding.local_batch_size(global_batch_size, 'eval_batch_size')
  p, count = sharding.process_index, sharding.process_count
  mine = np.arange(p, len(split), count)
  per_process = -(-len(split) // count)
  steps = -(-per_process // local)
  padded = np.zeros(steps * local, np.int64)
  padded[:len(mine)] = mine
  mask = np.zeros(steps * local, np.float32)
  mask[:len(mine)] = 1.0
  elements = [{'indices': i, 'mask': m} for i, m in
              zip(padded.reshape(steps, local), mask.reshape(steps, local))]
  yield from _batches(split, elements, sharding, loading, 'mask')


def num_classes(data_config) -> int:
  """The number of classes, without decoding any image (for `--summary`)."""
  if data_config.path:
    subdirs, presplit = _folder_layout(data_config.path)
    if presplit:
      return len(_class_folders(os.path.join(data_config.path, 'train'),
                                'train folder'))
    return len(subdirs)
  if data_config.tfds_name:
    features = _tfds_builder(data_config).info.features
    label = features[data_config.label_key] if (
        data_config.label_key in features) else None
    if not hasattr(label, 'num_classes'):
      raise UserError(f'config data.label_key={data_config.label_key!r} is not '
                      f'a class label of tfds dataset {data_config.tfds_name!r};'
                      f' its features are {sorted(features.keys())}')
    return label.num_classes
  return 10
