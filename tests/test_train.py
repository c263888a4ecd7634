"""Training equivalences: 4 devices == 1 device, resumed == uninterrupted."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from jaxlab import models
from jaxlab import preemption
from jaxlab import records
from jaxlab import steps
from jaxlab import train
from jaxlab.checkpointing import Checkpoints
from jaxlab.errors import UserError
from jaxlab.preprocessing import Preprocess
from tests.conftest import ROOT
from tests.conftest import SmallDisk
from tests.conftest import make_image_folder
from tests.conftest import run_launch
from tests.conftest import finish_launch_distributed
from tests.conftest import run_launch_distributed
from tests.conftest import start_launch_distributed
from tests.conftest import write_images

LOSS_KEYS = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy')
RESULT_KEYS = LOSS_KEYS + ('test_loss', 'test_accuracy', 'num_test_examples')


def _small_args(data_path, workdir, epochs, batch=8, size=24):
  return ['--config', 'configs/cnn_bn.py', '--workdir', workdir,
          f'--config.data.path={data_path}', f'--config.data.image_size={size}',
          f'--config.batch_size={batch}', f'--config.eval_batch_size={batch}',
          f'--config.num_epochs={epochs}', '--config.optimizer.momentum=0.9']


@pytest.fixture(scope='module')
def awkward_folder(tmp_path_factory):
  """Pre-split: 48 training images, 37 test images (awkward for batch 8)."""
  root = str(tmp_path_factory.mktemp('data') / 'awkward')
  for c, n_test in enumerate((13, 12, 12)):
    write_images(os.path.join(root, 'train', f'c{c}'), 16, c, mode='RGBA')
    write_images(os.path.join(root, 'test', f'c{c}'), n_test, c, seed=1,
                 mode='RGBA')
  return root


def _history_and_results(workdir):
  return records.read_history(workdir), records.read_results(workdir)


@pytest.fixture(scope='module')
def four_device_run(awkward_folder, tmp_path_factory):
  """History and results of 2 epochs of cnn_bn on 4 devices."""
  workdir = str(tmp_path_factory.mktemp('dev4'))
  run_launch(*_small_args(awkward_folder, workdir, epochs=2), devices=4)
  return _history_and_results(workdir)


# Different device counts reduce in different orders, so float rounding
# differs: after two epochs, a test loss near 0 (0.026) differed by 1.3e-4
# between 1 and 4 devices, the train loss by 1.5e-5 relative. BatchNorm
# statistics left unaveraged over devices changed the first epoch's train
# loss by 80 %.
# Collectives across processes add the devices' values in another order than
# within one, with the same effect (2 processes of 2 devices against 1 of 4:
# the first epoch's train loss differed by 6e-8 relative, the second's by
# 1.3e-5, the validation loss near 0 by 1.3e-4).
_OTHER_DEVICE_COUNT_TOLERANCE = dict(rtol=1e-4, atol=5e-4)


def _assert_same_run(got, expected, rtol=1e-5, atol=0.0):
  (h, r), (h_expected, r_expected) = got, expected
  assert r['num_test_examples'] == r_expected['num_test_examples'] == 37
  assert [e['epoch'] for e in h] == [e['epoch'] for e in h_expected]
  for e, e_expected in zip(h, h_expected, strict=True):
    for key in LOSS_KEYS:
      np.testing.assert_allclose(e[key], e_expected[key], rtol=rtol,
                                 atol=atol, err_msg=key)
  for key in ('test_loss', 'test_accuracy'):
    np.testing.assert_allclose(r[key], r_expected[key], rtol=rtol, atol=atol,
                               err_msg=key)


def test_four_devices_match_one_device_batchnorm_included(awkward_folder,
                                                          four_device_run,
                                                          tmp_path):
  """Also streamed (four_device_run has the images in memory)."""
  workdir = str(tmp_path / 'dev1')
  run_launch(*_small_args(awkward_folder, workdir, epochs=2),
             '--config.data.cache=stream', devices=1)
  _assert_same_run(_history_and_results(workdir), four_device_run,
                   **_OTHER_DEVICE_COUNT_TOLERANCE)


def test_two_processes_stopped_by_sigterm_resume_as_one_process(
    awkward_folder, four_device_run, tmp_path):
  """jax.distributed: 2 processes of 2 devices; a SIGTERM to one of them
  stops both at the same step with a checkpoint (JAX's preemption sync);
  continued from it, streamed, they train as 1 process of 4 devices with
  the images in memory."""
  workdir = str(tmp_path / 'two_processes')
  args = _small_args(awkward_folder, workdir, epochs=2) + [
      '--config.checkpoint.every_steps=1']  # The signal comes early.
  procs = start_launch_distributed(*args, processes=2, devices=2)
  _wait_for_a_checkpoint(procs[0][1], workdir)
  procs[1][1].send_signal(signal.SIGTERM)
  errs = finish_launch_distributed(procs, check=False)
  for (_, proc), err in zip(procs, errs):
    assert proc.returncode == preemption.EXIT_STATUS, err
  stops = [re.findall(r'stopped: stopped by SIGTERM at .* \(after step '
                      r'(\d+)\)', err) for err in errs]
  assert stops[0] and stops[0] == stops[1], errs  # The same step.
  assert records.read_results(workdir) is None

  errs = run_launch_distributed(*args, '--config.data.cache=stream',
                                processes=2, devices=2)
  assert all(f'(after step {stops[0][0]})' in e for e in errs)
  _assert_same_run(_history_and_results(workdir), four_device_run,
                   **_OTHER_DEVICE_COUNT_TOLERANCE)


def _start(args) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.Popen([sys.executable, 'launch.py', *args], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, start_new_session=True)


def _assert_same_numbers(workdir: str, reference: str) -> None:
  """The run in `workdir` ended with `reference`'s results and history."""
  got, expected = (records.read_results(d) for d in (workdir, reference))
  assert {k: got[k] for k in RESULT_KEYS} == {k: expected[k]
                                             for k in RESULT_KEYS}
  strip = lambda h: [{k: e[k] for k in ('epoch',) + LOSS_KEYS} for e in h]
  assert strip(records.read_history(workdir)) == strip(
      records.read_history(reference))


def _checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in `workdir`, oldest first."""
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
                if d.isdigit())


def _positions(workdir: str) -> list[tuple[int, int]]:
  """(epochs done, steps into the next) of each checkpoint, oldest first."""
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
  try:
    return [(p.epochs_done, p.steps_into_epoch) for p in
            map(checkpoints.position, _checkpoint_steps(workdir))]
  finally:
    checkpoints.close()


def _wait_for_a_checkpoint(proc: subprocess.Popen, workdir: str) -> None:
  """Returns as soon as the run `proc` has a complete checkpoint."""
  deadline = time.time() + 240
  while not (os.path.isdir(os.path.join(workdir, 'checkpoints')) and
             _checkpoint_steps(workdir)) and proc.poll() is None:
    assert time.time() < deadline, 'no checkpoint after 240 s'
    time.sleep(0.02)


def _truncate_checkpoint(workdir: str, step: int) -> None:
  """Every file of the checkpoint cut to half, as a crashed filesystem or a
  copy cut short leaves them."""
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints',
                                             str(step))):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


# Tests of one worker share the fixture's run.
_SHARES_THREE_EPOCHS = pytest.mark.xdist_group('three_epochs')


@pytest.fixture(scope='module')
def three_epochs(tmp_path_factory):
  """A small image folder, and an uninterrupted 3-epoch run on it."""
  root = tmp_path_factory.mktemp('three_epochs')
  data = make_image_folder(str(root / 'imgs'), num_classes=3, per_class=24,
                           mode='RGBA')
  whole = str(root / 'whole')
  run_launch(*_small_args(data, whole, epochs=3, batch=4))
  return data, whole


@_SHARES_THREE_EPOCHS
def test_killed_run_resumes_to_the_uninterrupted_result(three_epochs,
                                                        tmp_path):
  data, whole = three_epochs
  broken = str(tmp_path / 'broken')
  # Killed right after its first checkpoint, 5 steps into epoch 1.
  args = _small_args(data, broken, epochs=3, batch=4) + [
      '--config.checkpoint.every_steps=5']
  proc = _start(args)
  _wait_for_a_checkpoint(proc, broken)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert records.read_results(broken) is None, 'run ended before the kill'
  assert _positions(broken)[0] == (0, 5)

  resumed = run_launch(*args)
  # The killed run's workdir lock is taken over, with a warning.
  assert 'Taking over the lock of pid' in resumed.stderr
  assert re.search(r'Resumed from the checkpoint of epoch \d, step \d+ of '
                   r'\d+ \(after step \d+\)', resumed.stderr)
  _assert_same_numbers(broken, whole)


@_SHARES_THREE_EPOCHS
def test_sigterm_mid_epoch_checkpoints_stops_and_resumes_exactly(
    three_epochs, tmp_path):
  data, whole = three_epochs
  stopped = str(tmp_path / 'stopped')
  args = _small_args(data, stopped, epochs=3, batch=4)
  proc = _start(args)
  _wait_for_a_checkpoint(proc, stopped)
  # Epoch 1 is done: stop in epoch 2; a second signal changes nothing.
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stderr = proc.communicate(timeout=120)[1].decode()
  assert proc.returncode == preemption.EXIT_STATUS, stderr
  assert 'Traceback' not in stderr, stderr
  line = stderr.strip().splitlines()[-1]
  assert re.fullmatch(r'stopped: stopped by SIGTERM at epoch \d(, step \d+ '
                      r'of \d+)? \(after step \d+\), with a checkpoint; run '
                      r'the same command again to resume from it', line), line
  assert records.read_results(stopped) is None
  assert len(_positions(stopped)) == 2

  resumed = run_launch(*args)
  assert 'Taking over' not in resumed.stderr  # The lock was released.
  _assert_same_numbers(stopped, whole)


@_SHARES_THREE_EPOCHS
def test_corrupted_newest_checkpoint_is_skipped_and_resume_is_exact(
    three_epochs, tmp_path):
  data, whole = three_epochs
  # The uninterrupted run as a crash before its results would leave it.
  broken = str(tmp_path / 'broken')
  shutil.copytree(whole, broken)
  os.remove(os.path.join(broken, records.RESULTS))
  newest = _checkpoint_steps(broken)[-1]
  _truncate_checkpoint(broken, newest)
  resumed = run_launch(*_small_args(data, broken, epochs=3, batch=4))
  assert f'{os.path.join(broken, "checkpoints", str(newest))} does not ' \
      'restore' in resumed.stderr
  assert 'Resumed from the checkpoint of epoch 2' in resumed.stderr
  _assert_same_numbers(broken, whole)
  assert os.path.isdir(os.path.join(broken, 'checkpoints_unreadable',
                                    str(newest)))
  # With every checkpoint unreadable: one line, and what to do.
  for step in _checkpoint_steps(broken):
    _truncate_checkpoint(broken, step)
  os.remove(os.path.join(broken, records.RESULTS))
  proc = run_launch(*_small_args(data, broken, epochs=3, batch=4),
                    check=False)
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith('error: no checkpoint in ') and (
      'run again to start from scratch' in line), line


def _tmpfs_bytes(folder: str) -> int:
  """What `folder`'s files take on a tmpfs: whole pages."""
  return sum(-(-os.path.getsize(os.path.join(root, name)) // 4096) * 4096
             for root, _, names in os.walk(folder) for name in names)


def _last_line(proc: subprocess.CompletedProcess) -> str:
  """The one line a run that cannot go on ends with."""
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  return proc.stderr.strip().splitlines()[-1]


@_SHARES_THREE_EPOCHS
def test_a_full_disk_ends_the_run_in_one_line_and_loses_nothing(
    three_epochs, tmp_path):
  data, whole = three_epochs
  first, second, _ = _checkpoint_steps(whole)  # Of epochs 1, 2, 3.
  checkpoint = _tmpfs_bytes(os.path.join(whole, 'checkpoints', str(first)))
  disk = SmallDisk(str(tmp_path / 'disk'), 64 << 20)
  try:
    workdir = os.path.join(disk.path, 'run')
    # Keeping one checkpoint: the failed save must not delete the one before.
    args = _small_args(data, workdir, epochs=3, batch=4) + [
        '--config.checkpoint.keep=1']
    # Room for the records and one and a half checkpoints: the second
    # checkpoint's save fails in the background.
    disk.fill(leave=_tmpfs_bytes(whole) - 2 * checkpoint + checkpoint // 2)
    line = _last_line(run_launch(*args, check=False))
    assert line.startswith(f'error: could not write {workdir}/checkpoints/'
                           f'{second}: No space left on device (the write '
                           'needed '), line
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(first)]
    # The checkpoint before it restores, to the uninterrupted run's arrays.
    restored, expected = (
        ocp.StandardCheckpointer().restore(
            os.path.join(d, 'checkpoints', str(first), 'default'))
        for d in (workdir, whole))
    jax.tree.map(np.testing.assert_array_equal, restored, expected)

    disk.remount('ro')
    line = _last_line(run_launch(*args, check=False))
    assert line.startswith(f'error: could not write {workdir}/lock.json: '
                           'Read-only file system'), line

    disk.remount('rw')
    disk.unfill()
    resumed = run_launch(*args)
    assert 'Resumed from the checkpoint of epoch 1' in resumed.stderr
    _assert_same_numbers(workdir, whole)
  finally:
    disk.close()


def test_second_run_on_a_workdir_is_refused_while_the_first_finishes(
    tmp_path):
  data = make_image_folder(str(tmp_path / 'imgs'), num_classes=3,
                           per_class=24, mode='RGBA')
  workdir = str(tmp_path / 'run')
  args = _small_args(data, workdir, epochs=3, batch=4)
  first = _start(args)
  lock = os.path.join(workdir, 'lock.json')
  deadline = time.time() + 240
  while not os.path.exists(lock) and first.poll() is None:
    assert time.time() < deadline, 'no lock after 240 s'
    time.sleep(0.02)
  # Paused, holding the lock, for as long as the second run takes.
  first.send_signal(signal.SIGSTOP)
  try:
    second = run_launch(*args, check=False)
  finally:
    first.send_signal(signal.SIGCONT)
  assert second.returncode != 0 and 'Traceback' not in second.stderr
  line = second.stderr.strip().splitlines()[-1]
  assert line.startswith(f'error: workdir {workdir} is in use by pid '
                         f'{first.pid} on host '), line
  first.communicate(timeout=300)
  assert first.returncode == 0
  assert [e['epoch'] for e in records.read_history(workdir)] == [1, 2, 3]
  assert records.read_results(workdir)['epochs'] == 3
  assert not os.path.exists(lock)


def _tiny_config(data_path, **overrides):
  config = default.get_config()
  config.data.path = data_path
  config.data.image_size = 16
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_epochs = 2
  config.progress_bar = False
  config.update_from_flattened_dict(overrides)
  return config


def test_train_and_evaluate_writes_history_results_and_events(tiny_folder,
                                                              tmp_path):
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(_tiny_config(tiny_folder), workdir)
  assert set(results) == {
      'model', 'epochs', 'train_loss', 'train_accuracy', 'val_loss',
      'val_accuracy', 'test_loss', 'test_accuracy', 'num_test_examples',
      'total_params', 'trainable_params'}
  assert results == records.read_results(workdir)
  assert results['num_test_examples'] == 4  # 10 % of 36 images.
  history = records.read_history(workdir)
  assert [h['epoch'] for h in history] == [1, 2]
  assert set(history[0]) == set(records.HISTORY_KEYS)
  assert all(h['images_per_sec'] > 0 for h in history)
  assert json.load(open(os.path.join(workdir, 'config.json')))['data'][
      'image_size'] == 16
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert _positions(workdir) == [(1, 0), (2, 0)]
  # The same run streamed from disk ends with exactly the same numbers.
  streamed = str(tmp_path / 'streamed')
  assert train.train_and_evaluate(
      _tiny_config(tiny_folder, **{'data.cache': 'stream'}), streamed) == results
  _assert_same_numbers(streamed, workdir)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tiny_folder,
                                                                 tmp_path):
  workdir = str(tmp_path / 'run')
  config = _tiny_config(tiny_folder, **{'optimizer.learning_rate': 1e30,
                                        'num_epochs': 3})
  with pytest.raises(train.TrainingDiverged,
                     match=r'training loss became (nan|inf) in epoch \d'):
    train.train_and_evaluate(config, workdir)
  history = records.read_history(workdir)
  assert _positions(workdir) == [(h['epoch'], 0) for h in history]
  assert all(math.isfinite(h['train_loss']) for h in history)
  assert records.read_results(workdir) is None


def test_resuming_with_another_config_is_refused(tiny_folder, tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_tiny_config(tiny_folder, num_epochs=1), workdir)
  with pytest.raises(UserError, match=r'config optimizer.learning_rate=0.05, '
                     r'not 0.1; use another --workdir'):
    train.train_and_evaluate(
        _tiny_config(tiny_folder, **{'optimizer.learning_rate': 0.1}), workdir)
  # More epochs is a continuation, not another run.
  results = train.train_and_evaluate(_tiny_config(tiny_folder, num_epochs=2),
                                     workdir)
  assert results['epochs'] == 2


def test_batch_larger_than_training_set_is_named(tiny_folder, tmp_path):
  with pytest.raises(UserError, match=r'batch_size=64 is larger than the 25 '
                     'training examples'):
    train.train_and_evaluate(_tiny_config(tiny_folder, batch_size=64),
                             str(tmp_path / 'run'))


def test_torn_last_history_line_is_dropped(tmp_path):
  path = tmp_path / records.HISTORY
  path.write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": 2, "tra')
  assert records.read_history(str(tmp_path)) == [{'epoch': 1,
                                                   'train_loss': 1.0}]
  records.truncate_history(str(tmp_path), 1)
  assert path.read_text() == '{"epoch": 1, "train_loss": 1.0}\n'


def test_bad_checkpoint_settings_fail_before_any_work(tmp_path):
  config = _tiny_config(str(tmp_path / 'no_data_needed'))
  config.checkpoint.keep = 0
  with pytest.raises(UserError, match=r'config checkpoint.keep=0 must be an '
                     'integer >= 1'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def _cnn2_state_and_batch():
  model = models.CNN2(num_classes=3)
  optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.1, momentum=0.9, frozen=()))
  state = steps.create_train_state(model, optimizer, jax.random.PRNGKey(0),
                                   (16, 16, 3))
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 255, (1, 4, 16, 16, 3), dtype=np.uint8),
           'label': rng.integers(0, 3, (1, 4)).astype(np.int32)}
  return state, batch


def test_train_step_takes_a_replicated_state_and_donates_it():
  state, batch = _cnn2_state_and_batch()
  p_train, _ = steps.pmapped_steps(Preprocess())
  replicated = steps.replicate(state)
  kept = steps.unreplicate(replicated)
  new, _ = p_train(replicated, batch)
  for before, leaf, after, copy in zip(*map(jax.tree.leaves,
                                            (state, replicated, new, kept))):
    assert leaf.is_deleted()  # Donated to the step...
    np.testing.assert_array_equal(copy, before)  # ...but not the copies.
    assert after.shape == np.shape(before) and after.sharding.is_fully_replicated
  assert int(new.step) == 1
  assert not np.array_equal(new.params['head']['kernel'],
                            state.params['head']['kernel'])


def test_train_step_updates_weights_in_place_without_copying_them():
  # Each weight matrix is read by the input gradient and then overwritten
  # by its update; XLA:CPU copied every one of them each step unless told
  # to order the two (runtime.XLA_DEFAULTS).
  state, batch = _cnn2_state_and_batch()
  p_train, _ = steps.pmapped_steps(Preprocess())
  hlo = p_train.lower(steps.replicate(state), batch).compile().as_text()
  entry = hlo[hlo.index('\nENTRY'):]
  parameters = re.findall(r'(%\S+) = f32\[\d+(?:,\d+)+\]\S* parameter\(',
                          entry)  # Every matrix or kernel.
  weights = [w for w in jax.tree.leaves(state.params) if np.ndim(w) > 1]
  assert len(parameters) == 2 * len(weights)  # The weights and momenta.
  copied = [p for p in parameters if f'copy({p})' in entry]
  assert not copied
