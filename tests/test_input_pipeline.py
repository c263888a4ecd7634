"""Datasets from every source, seeded batches, and exactly-once evaluation."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import default
from jaxlab import input_pipeline
from jaxlab.errors import UserError
from jaxlab.input_pipeline import Sharding
from tests.conftest import make_image_folder
from tests.conftest import write_images


def _data_config(**fields) -> ml_collections.ConfigDict:
  config = default.get_config().data
  config.update(fields)
  return config


def test_digits_are_split_70_20_10_at_the_configured_shape():
  ds = input_pipeline.load_dataset(_data_config(image_size=24, channels=4))
  assert (len(ds.train), len(ds.val), len(ds.test)) == (1258, 359, 180)
  assert ds.train.images.shape[1:] == (24, 24, 4)
  assert ds.train.images.dtype == np.uint8
  assert np.all(ds.train.images[..., 3] == 255)  # Opaque alpha.
  assert ds.num_classes == 10
  assert set(np.unique(ds.test.labels)) == set(range(10))


def test_split_depends_on_split_seed_only():
  a = input_pipeline.load_dataset(_data_config(image_size=8))
  b = input_pipeline.load_dataset(_data_config(image_size=8))
  c = input_pipeline.load_dataset(_data_config(image_size=8, split_seed=1))
  np.testing.assert_array_equal(a.test.images, b.test.images)
  assert not np.array_equal(a.test.images, c.test.images)


def test_unsplit_folder_keeps_rgba_and_splits_every_image_once(tmp_path):
  root = make_image_folder(str(tmp_path / 'imgs'), num_classes=3,
                           per_class=10, size=(30, 20), mode='RGBA')
  ds = input_pipeline.load_dataset(_data_config(path=root, image_size=12,
                                                channels=4))
  assert ds.class_names == ['class0', 'class1', 'class2']
  assert (len(ds.train), len(ds.val), len(ds.test)) == (21, 6, 3)
  assert ds.train.images.shape[1:] == (12, 12, 4)
  everything = np.concatenate([ds.train.images, ds.val.images, ds.test.images])
  assert len({im.tobytes() for im in everything}) == 30
  # The alpha channel is the file's, not a constant.
  assert len(np.unique(ds.train.images[..., 3])) > 1


def test_image_is_resized_like_pil_bilinear(tmp_path):
  root = str(tmp_path / 'imgs')
  for label, name in enumerate('abc'):
    write_images(os.path.join(root, name), 1, label, size=(40, 30), mode='RGB')
  ds = input_pipeline.load_dataset(_data_config(
      path=root, image_size=16, channels=3, split=(0.4, 0.3, 0.3)))
  expected = {np.asarray(Image.open(os.path.join(root, c, 'img000.png'))
                         .resize((16, 16), Image.BILINEAR)).tobytes()
              for c in 'abc'}
  got = {im.tobytes() for im in np.concatenate(
      [ds.train.images, ds.val.images, ds.test.images])}
  assert got == expected


def test_presplit_folder_with_jpeg(tmp_path):
  root = make_image_folder(str(tmp_path / 'scenes'), num_classes=2,
                           per_class=6, presplit=True, mode='RGB', ext='jpg')
  ds = input_pipeline.load_dataset(_data_config(path=root, image_size=10,
                                                channels=3))
  assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 4)
  np.testing.assert_array_equal(ds.val.images, ds.test.images)
  assert ds.train.images.shape[1:] == (10, 10, 3)


def test_folder_errors_name_the_culprit(tmp_path):
  with pytest.raises(UserError, match=r'data.path=.*nowhere is not a folder'):
    input_pipeline.load_dataset(_data_config(path=str(tmp_path / 'nowhere')))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(UserError, match=r'empty has no class sub-folders'):
    input_pipeline.load_dataset(_data_config(path=str(empty)))
  root = make_image_folder(str(tmp_path / 'imgs'), num_classes=2, per_class=5)
  os.makedirs(os.path.join(root, 'class9'))
  (tmp_path / 'imgs' / 'class9' / 'notes.txt').write_text('no image')
  with pytest.raises(UserError, match=r'class folder .*class9 has no PNG'):
    input_pipeline.load_dataset(_data_config(path=root))


def _truncate(path):
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


def test_truncated_image_fails_or_is_skipped_with_its_name(tmp_path, caplog):
  root = make_image_folder(str(tmp_path / 'imgs'), num_classes=2, per_class=10,
                           size=(64, 64))
  bad = os.path.join(root, 'class1', 'img003.png')
  _truncate(bad)
  with pytest.raises(UserError, match=r'cannot read image .*img003.png'):
    input_pipeline.load_dataset(_data_config(path=root))
  ds = input_pipeline.load_dataset(_data_config(path=root,
                                                skip_bad_images=True))
  assert len(ds.train) + len(ds.val) + len(ds.test) == 19
  assert 'img003.png' in caplog.text


def test_bad_channels_and_split_are_named():
  with pytest.raises(UserError, match=r'data.channels=2'):
    input_pipeline.load_dataset(_data_config(channels=2))
  with pytest.raises(UserError, match=r'data.split=\(0.5, 0.5, 0.5\)'):
    input_pipeline.load_dataset(_data_config(split=(0.5, 0.5, 0.5)))


def test_tfds_without_data_fails_at_once(tmp_path):
  with pytest.raises(UserError, match=r"tfds dataset 'mnist' is not prepared"):
    input_pipeline.load_dataset(_data_config(tfds_name='mnist',
                                             data_dir=str(tmp_path)))
  with pytest.raises(UserError, match=r"'no_such_dataset' is not a tensorflow"):
    input_pipeline.load_dataset(_data_config(tfds_name='no_such_dataset'))


def test_tfds_dataset_prepared_locally(tmp_path):
  import tensorflow_datasets as tfds

  class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """Six 5x7 grey images, 2 classes, a train and a test split."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(5, 7, 1)),
              'label': tfds.features.ClassLabel(names=['dark', 'light'])}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(4),
              'test': self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'image': np.full((5, 7, 1), 200 * (i % 2), np.uint8),
                  'label': i % 2}

  TinyShapes(data_dir=str(tmp_path)).download_and_prepare()
  ds = input_pipeline.load_dataset(_data_config(
      tfds_name='tiny_shapes', data_dir=str(tmp_path), image_size=8,
      channels=3))
  assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 2, 2)
  assert ds.class_names == ['dark', 'light']
  assert ds.train.images.shape == (4, 8, 8, 3)
  for image, label in zip(ds.train.images, ds.train.labels):
    assert np.all(image == 200 * label)


def _split(n):
  return input_pipeline.Split(
      np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(2, axis=1),
      np.arange(n, dtype=np.int32))


@pytest.mark.parametrize('n,batch,devices,processes',
                         [(37, 8, 4, 1), (37, 8, 2, 2), (5, 16, 4, 1),
                          (64, 16, 4, 1), (1, 4, 2, 2)])
def test_eval_counts_every_example_exactly_once(n, batch, devices, processes):
  seen = []
  for p in range(processes):
    sharding = Sharding(p, processes, devices)
    n_batches = 0
    for b in input_pipeline.eval_batches(_split(n), batch, sharding):
      assert b['image'].shape[:2] == (devices, batch // processes // devices)
      assert b['mask'].shape == b['label'].shape
      seen += list(b['label'][b['mask'] == 1])
      n_batches += 1
    if p == 0:
      first = n_batches
    assert n_batches == first  # Every process runs the same number.
  assert sorted(seen) == list(range(n))


def test_train_batches_are_seeded_per_epoch_and_drop_the_remainder():
  split, sharding = _split(37), Sharding(0, 1, 2)

  def labels(seed, epoch):
    return [b['label'] for b in input_pipeline.train_batches(
        split, 8, seed, epoch, sharding)]

  epoch1 = labels(0, 1)
  assert len(epoch1) == 4 and epoch1[0].shape == (2, 4)
  np.testing.assert_array_equal(np.stack(epoch1), np.stack(labels(0, 1)))
  assert not np.array_equal(np.stack(epoch1), np.stack(labels(0, 2)))
  assert not np.array_equal(np.stack(epoch1), np.stack(labels(1, 1)))
  assert len(set(np.concatenate([b.ravel() for b in epoch1]))) == 32


def test_train_batches_from_mid_epoch_are_the_rest_of_the_epoch():
  split, sharding = _split(37), Sharding(0, 1, 2)
  whole, rest = ([b['label'] for b in input_pipeline.train_batches(
      split, 8, 3, 2, sharding, first_step=first)] for first in (0, 3))
  np.testing.assert_array_equal(np.stack(rest), np.stack(whole[3:]))


def test_processes_take_disjoint_parts_of_each_train_batch():
  split = _split(40)
  parts = [np.stack([b['label'] for b in input_pipeline.train_batches(
      split, 8, 0, 1, Sharding(p, 2, 2))]) for p in range(2)]
  whole = np.stack([b['label'] for b in input_pipeline.train_batches(
      split, 8, 0, 1, Sharding(0, 1, 4))])
  np.testing.assert_array_equal(
      np.concatenate([parts[0].reshape(5, 4), parts[1].reshape(5, 4)], 1),
      whole.reshape(5, 8))


def test_batch_size_that_devices_cannot_split_is_named():
  with pytest.raises(UserError, match=r'batch_size=6 cannot be split evenly '
                     r'over 4 devices; use a multiple of 4'):
    Sharding(0, 1, 4).local_batch_size(6, 'batch_size')


def test_presplit_test_folder_missing_a_class_keeps_labels(tmp_path):
  root = make_image_folder(str(tmp_path / 'scenes'), num_classes=3,
                           per_class=6, presplit=True, mode='RGB')
  import shutil
  shutil.rmtree(os.path.join(root, 'test', 'class1'))
  ds = input_pipeline.load_dataset(_data_config(path=root, image_size=8,
                                                channels=3))
  assert ds.class_names == ['class0', 'class1', 'class2']
  assert sorted(set(ds.test.labels.tolist())) == [0, 2]
  # class2's test images are labelled 2, like class2's training images.
  mean = lambda split, label: split.images[split.labels == label].mean()
  assert abs(mean(ds.test, 2) - mean(ds.train, 2)) < 20
