"""Streamed splits read as splits in memory do; `data.cache=auto` chooses by
the memory budget; unreadable images found mid-epoch."""

import functools
import logging
import os

import numpy as np
import pytest

from configs import default
from jaxlab import input_pipeline
from jaxlab import sources
from jaxlab.errors import UserError
from jaxlab.input_pipeline import Sharding
from jaxlab.loader import Loading
from tests.conftest import make_image_folder
from tests.conftest import write_images


def _data_config(**fields):
  config = default.get_config().data
  config.update(fields)
  return config


def _all_batches(split, sharding, loading=None):
  """Two epochs of train batches and one pass of eval batches."""
  out = []
  for epoch in (1, 2):
    out += list(input_pipeline.train_batches(split, 8, 0, epoch, sharding,
                                             loading=loading))
  out += list(input_pipeline.eval_batches(split, 8, sharding, loading))
  return out


def _assert_same_batches(got, expected):
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory):
  """Unsplit, 3 classes of 13 RGB JPEGs of another size than the model's."""
  return make_image_folder(str(tmp_path_factory.mktemp('data') / 'jpegs'),
                           num_classes=3, per_class=13, mode='RGB', ext='jpg',
                           size=(30, 22))


def _memory_and_stream(**fields):
  return [input_pipeline.load_dataset(_data_config(cache=cache, **fields))
          for cache in ('memory', 'stream')]


@pytest.mark.parametrize('sharding', [Sharding(0, 1, 1), Sharding(0, 1, 4),
                                      Sharding(1, 2, 2)],
                         ids=['1device', '4devices', 'process1of2'])
def test_streamed_folder_gives_the_batches_in_memory_gives(jpeg_folder,
                                                           sharding):
  memory, stream = _memory_and_stream(path=jpeg_folder, image_size=12,
                                      channels=3)
  assert isinstance(memory.train, sources.Split)
  assert isinstance(stream.train, sources.ImageFiles)
  assert memory.source.endswith('memory') and stream.source.endswith('stream')
  for split in ('train', 'val', 'test'):
    assert len(getattr(memory, split)) == len(getattr(stream, split))
  _assert_same_batches(_all_batches(stream.train, sharding),
                       _all_batches(memory.train, sharding))
  _assert_same_batches(
      list(input_pipeline.eval_batches(stream.test, 8, sharding)),
      list(input_pipeline.eval_batches(memory.test, 8, sharding)))


def test_worker_processes_decode_the_same_batches(jpeg_folder):
  memory, stream = _memory_and_stream(path=jpeg_folder, image_size=12,
                                      channels=3)
  workers = Loading(threads=1, workers=2, skip_bad_images=False)
  # One epoch: each pass starts its worker processes (seconds).
  batches = lambda split, loading=None: list(input_pipeline.train_batches(
      split, 8, 0, 1, Sharding(0, 1, 2), loading=loading))
  _assert_same_batches(batches(stream.train, workers), batches(memory.train))


@functools.cache
def _tiny_stripes():
  """A tfds builder class, registered once per process."""
  import tensorflow_datasets as tfds

  class TinyStripes(tfds.core.GeneratorBasedBuilder):
    """20 train and 9 test 9x6 RGB PNGs, 3 classes."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(6, 9, 3)),
              'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(20, 0),
              'test': self._generate_examples(9, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield i, {'image': rng.integers(0, 256, (6, 9, 3), np.uint8),
                  'label': i % 3}

  return TinyStripes


def _tiny_tfds(data_dir: str, file_format: str) -> None:
  _tiny_stripes()(data_dir=data_dir,
                  file_format=file_format).download_and_prepare()


def test_streamed_tfds_gives_the_batches_in_memory_gives(tmp_path):
  _tiny_tfds(str(tmp_path / 'array_record'), 'array_record')
  memory, stream = _memory_and_stream(
      tfds_name='tiny_stripes', data_dir=str(tmp_path / 'array_record'),
      image_size=8, channels=3)
  assert isinstance(stream.train, sources.TfdsRecords)
  assert (len(stream.train), len(stream.test)) == (20, 9)
  for sharding in (Sharding(0, 1, 1), Sharding(0, 1, 4)):
    _assert_same_batches(_all_batches(stream.train, sharding),
                         _all_batches(memory.train, sharding))
  # A tfds dataset stored as tfrecord loads into memory, and says what to do
  # to stream it.
  _tiny_tfds(str(tmp_path / 'tfrecord'), 'tfrecord')
  from_tfrecord = input_pipeline.load_dataset(_data_config(
      tfds_name='tiny_stripes', data_dir=str(tmp_path / 'tfrecord'),
      image_size=8, channels=3, cache='memory'))
  np.testing.assert_array_equal(from_tfrecord.train.images,
                                memory.train.images)
  with pytest.raises(UserError, match=r'stored as tfrecord.*'
                     r'--file_format=array_record.*data.cache=memory'):
    input_pipeline.load_dataset(_data_config(
        tfds_name='tiny_stripes', data_dir=str(tmp_path / 'tfrecord'),
        image_size=8, channels=3, cache='stream'))


def test_auto_streams_when_the_decoded_splits_exceed_the_budget(jpeg_folder,
                                                                caplog):
  # 39 images at 64 x 64 x 3: 479,232 bytes decoded.
  fields = dict(path=jpeg_folder, image_size=64, channels=3, cache='auto')
  with caplog.at_level(logging.INFO):
    small = input_pipeline.load_dataset(_data_config(
        memory_budget_gb=400_000 / 2**30, **fields))
  assert isinstance(small.train, sources.ImageFiles)
  assert 'over the memory budget' in caplog.text
  assert 'streamed from disk (data.cache=auto)' in caplog.text
  caplog.clear()
  with caplog.at_level(logging.INFO):
    large = input_pipeline.load_dataset(_data_config(
        memory_budget_gb=500_000 / 2**30, **fields))
  assert isinstance(large.train, sources.Split)
  assert 'within the memory budget' in caplog.text
  # Decoded once into one array each: nothing else holds the images.
  assert large.train.images.base is None


def _truncate(path):
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


@pytest.mark.parametrize('workers', [0, 2])
def test_unreadable_image_found_mid_epoch_is_named_or_skipped(tmp_path,
                                                              workers, caplog):
  root = str(tmp_path / 'imgs')
  for c in range(2):
    write_images(os.path.join(root, 'train', f'c{c}'), 8, c, mode='RGB')
    write_images(os.path.join(root, 'test', f'c{c}'), 4, c, mode='RGB',
                 seed=1)
  bad = os.path.join(root, 'train', 'c1', 'img003.png')
  bad_test = os.path.join(root, 'test', 'c0', 'img001.png')
  _truncate(bad)
  _truncate(bad_test)
  fields = dict(path=root, image_size=8, channels=3, cache='stream',
                workers=workers)
  ds = input_pipeline.load_dataset(_data_config(**fields))  # Nothing decoded.
  strict = Loading(threads=2, workers=workers, skip_bad_images=False)
  with pytest.raises(UserError, match=r'cannot read image .*c1/img003.png '
                     r'.*skip_bad_images=True'):
    list(input_pipeline.train_batches(ds.train, 4, 0, 1, Sharding(0, 1, 1),
                                      loading=strict))
  if workers:
    return  # Found by a worker process, the error is the same; the rest is.
  skipping = Loading(threads=2, workers=workers, skip_bad_images=True)
  batches = list(input_pipeline.train_batches(
      ds.train, 4, 0, 1, Sharding(0, 1, 1), loading=skipping))
  assert len(batches) == 4  # Every batch keeps its size.
  assert 'Skipping unreadable image' in caplog.text and bad in caplog.text
  # In the batch, the next readable image of the split took its place.
  order = np.random.default_rng([0, 1]).permutation(16)
  row = int(np.flatnonzero(ds.train.paths[order] == bad)[0])
  substitute = ds.train.paths[order[row] + 1]
  expected = sources.decode(substitute, 8, 3)
  np.testing.assert_array_equal(batches[row // 4]['image'][0, row % 4],
                                expected)
  # In evaluation it is masked out: 7 of the 8 test images count.
  masks = [b['mask'] for b in input_pipeline.eval_batches(
      ds.test, 4, Sharding(0, 1, 1), skipping)]
  assert np.concatenate(masks).sum() == 7
  assert bad_test in caplog.text
