"""Datasets held in host memory as uint8 arrays, and the batches fed to devices.

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

Every image is decoded and resized once with PIL (bilinear, as torchvision's
`Resize` does on PIL images) and kept as uint8; conversion to float and any
normalisation happen on the device (see `jaxlab.preprocessing`). Batches come
from tf.data, which gathers and prefetches them on its own threads.
"""

import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from jaxlab import downloads
from jaxlab.errors import UserError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_PIL_MODES = {1: 'L', 3: 'RGB', 4: 'RGBA'}


@dataclasses.dataclass
class Split:
  """One split: images [N, H, W, C] uint8 and labels [N] int32."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  @functools.cached_property
  def tf_images(self):
    """The images as one TF tensor, made once, for tf.data to gather from."""
    return _tf().constant(self.images)


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
  if channels not in _PIL_MODES:
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


def _check_split(fractions: Sequence[float]) -> None:
  fractions = tuple(fractions)
  if (len(fractions) != 3 or
      not all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in fractions)
      or abs(sum(fractions) - 1) > 1e-6 or fractions[0] == 0):
    raise UserError(f'config data.split={fractions} must be three fractions '
                    'in [0, 1] (train, val, test) adding up to 1, train above '
                    '0')


def load_dataset(data_config) -> Dataset:
  """Loads the dataset that the config's `data` section names."""
  check_data_config(data_config)
  if data_config.path:
    return _load_folder(data_config)
  if data_config.tfds_name:
    return _load_tfds(data_config)
  return _load_digits(data_config)


def _to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
  image = image.convert(_PIL_MODES[channels])
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if channels == 1 else array


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


def _split(images, labels, data_config, where: str) -> list[Split]:
  parts = _split_indices(len(labels), data_config.split,
                         data_config.split_seed, where)
  return [Split(images[idx], labels[idx]) for idx in parts]


def _load_digits(data_config) -> Dataset:
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  size, channels = data_config.image_size, data_config.channels
  images = np.stack([
      _to_array(Image.fromarray(np.uint8(np.round(d * 255 / 16))), size,
                channels) for d in digits.images])
  labels = digits.target.astype(np.int32)
  train, val, test = _split(images, labels, data_config, 'the digits dataset')
  return Dataset(train, val, test, [str(i) for i in range(10)],
                 source='scikit-learn digits')


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


def _read_image(path: str, size: int, channels: int) -> np.ndarray:
  with Image.open(path) as image:
    image.load()  # Decodes fully, so truncated files fail here.
    return _to_array(image, size, channels)


def _decode_all(paths: list[str], labels: np.ndarray,
                data_config) -> tuple[np.ndarray, np.ndarray]:
  """Decodes and resizes every image in parallel; bad ones fail or are skipped."""
  size, channels = data_config.image_size, data_config.channels

  def read(path):
    try:
      return _read_image(path, size, channels)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      if not data_config.skip_bad_images:
        raise UserError(f'cannot read image {path} ({e}); fix or remove it, '
                        'or set --config.data.skip_bad_images=True to skip '
                        'unreadable images') from None
      logging.warning('Skipping unreadable image %s (%s)', path, e)
      return None

  workers = min(32, (os.cpu_count() or 1) * 4)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    arrays = list(pool.map(read, paths))
  keep = [i for i, a in enumerate(arrays) if a is not None]
  if not keep:
    raise UserError(f'no readable image among the {len(paths)} in '
                    f'data.path={data_config.path}')
  return np.stack([arrays[i] for i in keep]), labels[keep]


def _read_class_tree(root: str, class_names: list[str], data_config):
  """Every image of `root/<class>/`, labelled by the class's index in
  `class_names`; a class without a folder under `root` has no images here."""
  paths, labels = [], []
  for label, name in enumerate(class_names):
    if not os.path.isdir(os.path.join(root, name)):
      continue
    files = _list_images(os.path.join(root, name))
    paths += files
    labels += [label] * len(files)
  return _decode_all(paths, np.asarray(labels, np.int32), data_config)


def _folder_layout(root: str) -> tuple[set[str], bool]:
  """The sub-folders of `data.path`, and whether it holds train/ and test/."""
  if not os.path.isdir(root):
    raise UserError(f'config data.path={root} is not a folder; point it at a '
                    'folder with one sub-folder of images per class, or at '
                    'one with train/ and test/ sub-folders')
  subdirs = set(_class_folders(root, 'config data.path'))
  return subdirs, {'train', 'test'} <= subdirs


def _load_folder(data_config) -> Dataset:
  root = data_config.path
  subdirs, presplit = _folder_layout(root)
  if presplit:
    train_dir = os.path.join(root, 'train')
    class_names = _class_folders(train_dir, 'train folder')
    splits = {}
    val_name = next((v for v in ('val', 'validation') if v in subdirs), 'test')
    for split_name in {'train', 'test', val_name}:
      split_dir = os.path.join(root, split_name)
      extra = set(_class_folders(split_dir, f'{split_name} folder')) - set(
          class_names)
      if extra:
        raise UserError(f'{split_dir} has class folder(s) {sorted(extra)} that '
                        f'{train_dir} lacks; both must hold the same classes')
      splits[split_name] = Split(*_read_class_tree(split_dir, class_names,
                                                   data_config))
    return Dataset(splits['train'], splits[val_name], splits['test'],
                   class_names, source=f'image folder {root} (pre-split)')
  class_names = sorted(subdirs)
  images, labels = _read_class_tree(root, class_names, data_config)
  train, val, test = _split(images, labels, data_config, f'data.path={root}')
  return Dataset(train, val, test, class_names, source=f'image folder {root}')


# --------------------------------------------------------------------------
# tensorflow-datasets.


def _load_tfds(data_config) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _tf()
  name, data_dir = data_config.tfds_name, data_config.data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'config data.tfds_name={name!r} is not a '
                    'tensorflow-datasets dataset; see '
                    'tfds.list_builders()') from None
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
  size, channels = data_config.image_size, data_config.channels

  def read(split_name) -> Split:
    images, labels = [], []
    for example in tfds.as_numpy(builder.as_dataset(split=split_name)):
      image = example[image_key]
      if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
      images.append(_to_array(Image.fromarray(image), size, channels))
      labels.append(example[label_key])
    return Split(np.stack(images), np.asarray(labels, np.int32))

  splits = set(builder.info.splits.keys())
  if 'train' not in splits:
    raise UserError(f'tfds dataset {name!r} has no train split (it has '
                    f'{sorted(splits)})')
  held_out = [s for s in ('validation', 'test') if s in splits]
  if held_out:
    train = read('train')
    val = read(held_out[0])
    test = read(held_out[-1]) if len(held_out) > 1 else val
  else:
    whole = read('train')
    train, val, test = _split(whole.images, whole.labels, data_config,
                              f'tfds dataset {name!r}')
  class_names = list(getattr(features[label_key], 'names', None) or
                     [str(i) for i in range(features[label_key].num_classes)])
  return Dataset(train, val, test, class_names, source=f'tfds {name}')


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


def _batches(split: Split, index_batches: np.ndarray,
             sharding: Sharding) -> Iterator[dict]:
  """Gathers [steps, local_batch] indices into device-shaped numpy batches."""
  tf = _tf()
  images = split.tf_images
  labels = tf.constant(split.labels)
  n_dev = sharding.local_device_count

  def gather(idx):
    return {'image': tf.gather(images, idx), 'label': tf.gather(labels, idx)}

  ds = tf.data.Dataset.from_tensor_slices(index_batches)
  ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(2)
  for batch in ds.as_numpy_iterator():
    yield {k: v.reshape((n_dev, -1) + v.shape[1:]) for k, v in batch.items()}


def train_batches(split: Split, global_batch_size: int, seed: int, epoch: int,
                  sharding: Sharding, first_step: int = 0) -> Iterator[dict]:
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
  yield from _batches(split, order[first_step:, start:start + local],
                      sharding)


def steps_per_epoch(split: Split, global_batch_size: int) -> int:
  return len(split) // global_batch_size


def eval_batches(split: Split, global_batch_size: int,
                 sharding: Sharding) -> Iterator[dict]:
  """Batches that cover every example of `split` exactly once.

  Examples are dealt to processes round-robin; each process pads its share
  to whole batches by repeating example 0 and marks real examples in
  `mask` (1.0) and padding (0.0). Every process runs the same number of
  batches, as the collective eval step requires.
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
  masks = mask.reshape(steps, sharding.local_device_count, -1)
  for batch, batch_mask in zip(
      _batches(split, padded.reshape(steps, local), sharding), masks):
    batch['mask'] = batch_mask
    yield batch


def num_classes(data_config) -> int:
  """The number of classes, without decoding any image (for `--summary`)."""
  if data_config.path:
    subdirs, presplit = _folder_layout(data_config.path)
    if presplit:
      return len(_class_folders(os.path.join(data_config.path, 'train'),
                                'train folder'))
    return len(subdirs)
  if data_config.tfds_name:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      builder = tfds.builder(data_config.tfds_name,
                             data_dir=data_config.data_dir or None,
                             try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(f'config data.tfds_name={data_config.tfds_name!r} is '
                      'not a tensorflow-datasets dataset') from None
    features = builder.info.features
    label = features[data_config.label_key] if (
        data_config.label_key in features) else None
    if not hasattr(label, 'num_classes'):
      raise UserError(f'config data.label_key={data_config.label_key!r} is not '
                      f'a class label of tfds dataset {data_config.tfds_name!r};'
                      f' its features are {sorted(features.keys())}')
    return label.num_classes
  return 10
