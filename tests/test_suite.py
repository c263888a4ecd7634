"""Suites over seeds, their resumption, failures, and the report."""

import csv
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlab import records
from jaxlab import report
from tests.conftest import ROOT
from tests.conftest import run_launch

TINY = ('--config', 'configs/suites/tiny.py')
# One worker runs this file's tests, so the tiny suite trains once.
pytestmark = pytest.mark.xdist_group('suite')


@pytest.fixture(scope='module')
def tiny_suite(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('suite') / 'tiny')
  run_launch(*TINY, '--workdir', workdir)
  return workdir


def _table(markdown: str, heading: str) -> dict[str, dict[str, str]]:
  """The rows of the table under `## heading`, keyed by experiment."""
  section = markdown.split(f'## {heading}\n', 1)[1].split('\n## ', 1)[0]
  lines = [l for l in section.splitlines() if l.startswith('|')]
  header = [c.strip() for c in lines[0].strip('|').split('|')]
  rows = [[c.strip() for c in l.strip('|').split('|')] for l in lines[2:]]
  return {row[0]: dict(zip(header, row)) for row in rows}


def _mean_std(cell: str) -> tuple[float, float]:
  mean, std = cell.split(' ± ')
  return float(mean), float(std)


def test_tiny_suite_report_matches_results_by_hand(tiny_suite):
  markdown = open(os.path.join(tiny_suite, 'report.md')).read()
  table = _table(markdown, 'Results')
  losses = _table(markdown, 'Final train and validation loss')
  assert list(table) == ['cnn_bn', 'fc']
  for experiment, row in table.items():
    results = [records.read_results(os.path.join(tiny_suite, experiment,
                                                  f'seed_{s}')) for s in (0, 1)]
    assert row['Seeds'] == '2' and row['Epochs'] == '2'
    for column, key in [('Loss', 'train_loss'), ('Accuracy', 'train_accuracy'),
                        ('Acc on test', 'test_accuracy'),
                        ('Val accuracy', 'val_accuracy')]:
      values = [r[key] for r in results]
      mean, std = _mean_std(row[column])
      assert mean == pytest.approx(np.mean(values), abs=5e-5), column
      assert std == pytest.approx(np.std(values, ddof=1), abs=5e-5), column
    assert row['Trainable params'] == f'{results[0]["trainable_params"]:,}'
    val_mean, _ = _mean_std(losses[experiment]['Val loss'])
    assert val_mean == pytest.approx(np.mean([r['val_loss'] for r in results]),
                                     abs=5e-5)
  with open(os.path.join(tiny_suite, 'report.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [(r['experiment'], r['seed'], r['status']) for r in rows] == [
      ('cnn_bn', '0', 'finished'), ('cnn_bn', '1', 'finished'),
      ('fc', '0', 'finished'), ('fc', '1', 'finished')]
  figures = sorted(os.listdir(os.path.join(tiny_suite, 'figures')))
  assert figures == ['loss_cnn_bn.png', 'loss_fc.png', 'train_accuracy.png',
                     'train_loss.png', 'val_accuracy.png', 'val_loss.png']
  for name in figures:
    assert f'figures/{name}' in markdown
    assert open(os.path.join(tiny_suite, 'figures', name),
                'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_report_on_demand_is_the_same(tiny_suite, tmp_path):
  before = open(os.path.join(tiny_suite, 'report.md')).read()
  proc = subprocess.run([sys.executable, '-m', 'jaxlab.report', tiny_suite],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert open(os.path.join(tiny_suite, 'report.md')).read() == before


def test_killed_suite_resumes_without_rerunning_and_reports_the_same(
    tiny_suite, tmp_path):
  workdir = str(tmp_path / 'tiny')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.Popen([sys.executable, 'launch.py', *TINY, '--workdir',
                           workdir], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  first = os.path.join(workdir, 'cnn_bn', 'seed_0', records.RESULTS)
  deadline = time.time() + 300
  while not os.path.exists(first) and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, 'report.md')), (
      'the suite ended before the kill')
  finished_before = os.stat(first).st_mtime_ns

  resumed = run_launch(*TINY, '--workdir', workdir)
  assert os.stat(first).st_mtime_ns == finished_before
  assert re.search(r'already finished 2 epochs', resumed.stderr)
  assert open(os.path.join(workdir, 'report.md')).read().replace(
      'tiny', '') == open(os.path.join(tiny_suite, 'report.md')).read(
      ).replace('tiny', '')


def test_failing_run_is_reported_and_the_others_complete(tmp_path):
  suite_file = tmp_path / 'suite.py'
  suite_file.write_text(
      'import ml_collections\n'
      'from jaxlab.suite import experiment\n'
      'def get_config():\n'
      '  c = ml_collections.ConfigDict()\n'
      '  c.seeds = (0,)\n'
      "  c.data_path = ''\n"
      '  small = {"data.image_size": 12, "num_epochs": 1}\n'
      '  c.experiments = [\n'
      "      experiment('missing_data', 'configs/default.py',\n"
      f"                 {{**small, 'data.path': '{tmp_path}/nowhere'}}),\n"
      "      experiment('fine', 'configs/default.py', small)]\n"
      '  return c\n')
  workdir = str(tmp_path / 'run')
  run_launch('--config', str(suite_file), '--workdir', workdir)
  assert records.read_results(os.path.join(workdir, 'fine', 'seed_0'))
  markdown = open(os.path.join(workdir, 'report.md')).read()
  failed = _table(markdown, 'Runs that did not finish')
  assert failed['missing_data']['Status'] == 'failed'
  assert 'nowhere is not a folder' in failed['missing_data']['Error']
  assert list(_table(markdown, 'Results')) == ['fine']
  runs = {r.experiment: r.status for r in report.find_runs(workdir)}
  assert runs == {'missing_data': 'failed', 'fine': 'finished'}


def test_suite_typo_fails_before_training(tmp_path):
  proc = run_launch(*TINY, '--workdir', str(tmp_path / 'w'),
                    '--config.seeds=()', check=False)
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: config seeds is empty; give at least one seed')


def test_suite_override_of_wrong_type_or_key_is_named():
  import ml_collections
  from jaxlab import suite
  from jaxlab.errors import UserError
  config = ml_collections.ConfigDict({'data_path': '', 'seeds': (0,)})
  bad_type = suite.experiment('x', 'configs/default.py',
                              {'optimizer.frozen': 3})
  with pytest.raises(UserError, match=r"'x': override optimizer.frozen=3 "
                     'does not fit'):
    suite.run_config(config, bad_type, 0)
  bad_key = suite.experiment('y', 'configs/default.py', {'optimiser.name': 1})
  with pytest.raises(UserError, match=r"'y': override 'optimiser.name' is not "
                     'a key of configs/default.py'):
    suite.run_config(config, bad_key, 0)
