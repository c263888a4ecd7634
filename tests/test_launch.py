"""launch.py end to end: every config for one short epoch, --summary, and
one-line errors for user mistakes."""

import glob
import os

import pytest

from jaxlab import records
from tests.conftest import ROOT
from tests.conftest import make_image_folder
from tests.conftest import run_launch

CONFIGS = sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'configs',
                                                             '*.py'))
    if not p.endswith(('__init__.py', '_base.py')))


@pytest.fixture(scope='module')
def rgba_folder(tmp_path_factory):
  return make_image_folder(str(tmp_path_factory.mktemp('data') / 'rgba'),
                           num_classes=3, per_class=10, mode='RGBA')


def test_every_experiment_has_a_config():
  names = {os.path.basename(c)[:-3] for c in CONFIGS}
  assert {'default', 'fc_relu', 'fc_sigmoid', 'cnn1', 'cnn2', 'cnn_bn',
          'cnn_rmsprop'} <= names


@pytest.mark.parametrize('config', CONFIGS)
def test_one_short_epoch(config, rgba_folder, tmp_path):
  workdir = str(tmp_path / 'run')
  run_launch('--config', config, '--workdir', workdir,
             f'--config.data.path={rgba_folder}', '--config.data.channels=4',
             '--config.data.image_size=32', '--config.batch_size=4',
             '--config.eval_batch_size=4', '--config.num_epochs=1')
  results = records.read_results(workdir)
  assert results['epochs'] == 1
  assert results['num_test_examples'] == 3
  assert 0.0 <= results['test_accuracy'] <= 1.0
  assert len(records.read_history(workdir)) == 1


@pytest.mark.parametrize('config', CONFIGS)
def test_summary(config):
  out = run_launch('--config', config, '--summary').stdout.splitlines()
  assert out[-3].startswith('Total params: ')
  assert out[-2].startswith('Trainable params: ')
  assert out[-1] == 'Non-trainable params: 0'
  assert any(line.startswith('head') for line in out)


def _error_line(*args, devices=1):
  proc = run_launch(*args, devices=devices, check=False)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  return proc.stderr.strip().splitlines()[-1]


def test_missing_data_folder_is_one_line(tmp_path):
  line = _error_line('--workdir', str(tmp_path / 'run'),
                     f'--config.data.path={tmp_path}/missing')
  assert line.startswith('error: config data.path=')
  assert 'missing is not a folder' in line


def test_misspelt_config_key_is_one_line():
  line = _error_line('--config.optimiser.learning_rate=0.1')
  assert line.startswith('error: unknown config key optimiser')
  assert 'Did you mean optimizer' in line


def test_batch_that_devices_cannot_split_is_one_line(tmp_path):
  line = _error_line('--workdir', str(tmp_path / 'run'),
                     '--config.batch_size=6', devices=4)
  assert line == ('error: config batch_size=6 cannot be split evenly over 4 '
                  'devices; use a multiple of 4')


def test_unknown_model_is_one_line(tmp_path):
  line = _error_line('--workdir', str(tmp_path / 'run'),
                     '--config.model.name=resnet')
  assert line.startswith("error: config model.name='resnet' is not a model")
