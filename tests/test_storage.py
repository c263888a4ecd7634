"""Writes into a disk that is full or read-only: one clear error, and every
file written before stays whole."""

import os

import pytest

from jaxlab import pretrained
from jaxlab import records
from jaxlab import report
from jaxlab import storage
from jaxlab import workdir_lock
from tests.test_pretrained import _save_safetensors
from tests.test_pretrained import _small_torchvision_state


def _assert_names(error, path: str, reason: str) -> None:
  message = str(error.value)
  assert len(message.splitlines()) == 1, message
  assert message.startswith(f'could not write {path}: {reason} (the write '
                            'needed '), message
  assert 'free there' in message and 'run the same command again' in message


def test_a_full_disk_keeps_the_old_file_and_names_the_new_one(small_disk):
  path = os.path.join(small_disk.path, 'results.json')
  records.write_json(path, {'test_accuracy': 0.5})
  small_disk.fill(leave=0)
  with pytest.raises(storage.WriteFailed) as e:
    records.write_json(path, {'test_accuracy': 0.75, 'pad': 'x' * 10_000})
  _assert_names(e, path, 'No space left on device')
  assert 'needed 9.8 KiB; 0 B free there' in str(e.value)
  assert records.read_json(path) == {'test_accuracy': 0.5}
  assert sorted(os.listdir(small_disk.path)) == ['.filler', 'results.json']


def test_a_history_line_that_does_not_fit_leaves_no_torn_line(small_disk):
  workdir = small_disk.path
  records.append_history(workdir, {'epoch': 1, 'train_loss': 1.0})
  # The first line's page has room left: fill it to the last byte.
  small_disk.fill(leave=0)
  with open(os.path.join(workdir, records.HISTORY)) as f:
    before = f.read()
  with pytest.raises(storage.WriteFailed) as e:
    records.append_history(workdir, {'epoch': 2, 'pad': 'x' * 8192})
  _assert_names(e, os.path.join(workdir, records.HISTORY),
                'No space left on device')
  with open(os.path.join(workdir, records.HISTORY)) as f:
    assert f.read() == before
  assert records.read_history(workdir) == [{'epoch': 1, 'train_loss': 1.0}]


def test_a_read_only_disk_is_named(small_disk):
  small_disk.remount('ro')
  path = os.path.join(small_disk.path, 'config.json')
  with pytest.raises(storage.WriteFailed) as e:
    records.write_config(small_disk.path, {'seed': 0})
  _assert_names(e, path, 'Read-only file system')
  # Nor is a lock taken: the workdir cannot hold one.
  with pytest.raises(storage.WriteFailed) as e:
    with workdir_lock.hold(small_disk.path):
      pass
  _assert_names(e, os.path.join(small_disk.path, workdir_lock.LOCK),
                'Read-only file system')


def test_a_lock_that_does_not_fit_is_not_left_empty(small_disk):
  small_disk.fill(leave=0)
  with pytest.raises(storage.WriteFailed):
    with workdir_lock.hold(small_disk.path):
      pass
  assert not os.path.exists(os.path.join(small_disk.path, workdir_lock.LOCK))


def test_tensorboard_events_on_a_full_disk_are_named(small_disk):
  small_disk.fill(leave=0)
  with pytest.raises(storage.WriteFailed) as e:
    # TensorFlow writes the file's first event when the writer opens.
    records.metric_writer(small_disk.path)
  small_disk.unfill()
  writer = records.metric_writer(small_disk.path)
  small_disk.fill(leave=0)
  with pytest.raises(storage.WriteFailed) as later:
    for step in range(64):  # More than the events file's last page holds.
      writer.write_scalars(step, {'train_loss' + '_' * 200: 1.0})
    writer.flush()
  for error in (e, later):
    message = str(error.value)
    assert message.startswith(f'could not write {small_disk.path}'), message
    assert 'events.out.tfevents' in message
    assert 'No space left on device' in message


def _finished_run(folder: str, seed: int) -> None:
  os.makedirs(folder)
  records.write_config(folder, {'model': {'name': 'cnn2'}, 'seed': seed})
  for epoch in (1, 2):
    records.append_history(folder, {'epoch': epoch, 'train_loss': 1 / epoch,
                                    'val_loss': 1.1 / epoch,
                                    'train_accuracy': 0.5,
                                    'val_accuracy': 0.5})
  records.write_results(folder, {
      'model': 'cnn2', 'epochs': 2, 'train_loss': 0.5, 'train_accuracy': 0.5,
      'val_loss': 0.55, 'val_accuracy': 0.5, 'test_loss': 0.6,
      'test_accuracy': 0.5, 'num_test_examples': 10, 'total_params': 10,
      'trainable_params': 10})


def test_a_report_whose_figures_do_not_fit_is_named(small_disk):
  root = small_disk.path
  for seed in (0, 1):
    _finished_run(os.path.join(root, 'cnn2', f'seed_{seed}'), seed)
  small_disk.fill(leave=8192)  # Room for a table, not for the figures.
  with pytest.raises(storage.WriteFailed) as e:
    report.write_report(root)
  message = str(e.value)
  assert message.startswith(f'could not write {root}/figures/'), message
  assert '.png: No space left on device' in message
  assert not [f for f in os.listdir(os.path.join(root, 'figures'))
              if f.endswith('.tmp')]


def test_converted_weights_that_do_not_fit_are_named(small_disk, tmp_path):
  source = _save_safetensors(_small_torchvision_state(),
                             str(tmp_path / 'small.safetensors'))
  out = os.path.join(small_disk.path, 'small.msgpack')
  small_disk.fill(leave=4096)
  with pytest.raises(storage.WriteFailed) as e:
    pretrained.convert(source, out)
  _assert_names(e, out, 'No space left on device')
  assert os.listdir(small_disk.path) == ['.filler']


def test_sizes_read_as_people_write_them():
  assert [storage.format_bytes(n) for n in (0, 812, 10_240, 4_300_000,
                                            3 << 30, None)] == [
      '0 B', '812 B', '10.0 KiB', '4.1 MiB', '3.0 GiB', 'an unknown amount']


def test_only_refused_writes_count_as_write_errors():
  assert storage.is_write_error(OSError(28, 'No space left on device'))
  assert storage.is_write_error(ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.conv1.kernel/0" in OCDBT '
      "database: Failed to write 12 bytes to file 15: No space left on "
      "device [os_error_code='28']"))
  assert not storage.is_write_error(ValueError('shapes do not match'))
  error = ValueError("PERMISSION_DENIED: ... [os_error_code='13']")
  assert 'Permission denied' in str(storage.failure('/x/y', error, 1))
