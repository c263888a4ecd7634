"""The benchmarks end to end, at tiny sizes: train_step.py's table against
PyTorch, its jaxlab side with TensorFlow missing, as on the GPU image, and
input_pipeline.py's streaming against PyTorch's DataLoader."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEADER = ('model | batch | jaxlab img/s | PyTorch img/s | ratio | GFLOP/s | '
          '% of peak | compile s | peak MiB')


def _run_benchmark(tmp_path, *args, block_tensorflow=False) -> dict:
  """Runs the benchmark (one device, 1 timed step per model); returns its
  table's rows by model name, each a dict of the header's columns."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if block_tensorflow:
    fake = tmp_path / 'no_tensorflow' / 'tensorflow'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text(
        "raise ImportError('TensorFlow is not installed on the GPU image')\n")
    env['PYTHONPATH'] = os.pathsep.join(
        [str(fake.parent)] + [p for p in [env.get('PYTHONPATH')] if p])
    blocked = subprocess.run([sys.executable, '-c', 'import tensorflow'],
                             env=env, capture_output=True, check=False)
    assert blocked.returncode != 0, 'the fake tensorflow did not shadow it'
  proc = subprocess.run(
      [sys.executable, 'benchmarks/train_step.py', '--repeats', '1',
       '--warmup', '0', '--steps-per-turn', '1', *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert HEADER in lines, proc.stdout
  columns = HEADER.split(' | ')
  rows = [dict(zip(columns, line.split(' | ')))
          for line in lines[lines.index(HEADER) + 1:] if ' | ' in line]
  return {row['model']: row for row in rows}


def test_table_compares_jaxlab_with_pytorch(tmp_path):
  pytest.importorskip('torch')
  row = _run_benchmark(tmp_path, '--models', 'scratch_cnn', '--batch', '2'
                       )['scratch_cnn']
  assert row['batch'] == '2'
  jax_rate = float(row['jaxlab img/s'])
  # Eager, and eager channels-last (a model with convolutions).
  torch_rates = [float(rate) for rate in row['PyTorch img/s'].split(' / ')]
  assert len(torch_rates) == 2
  assert jax_rate > 0 and min(torch_rates) > 0
  # The ratio is jaxlab's speed over the fastest PyTorch's, from the same
  # medians.
  assert float(row['ratio']) == pytest.approx(jax_rate / max(torch_rates),
                                              rel=0.02, abs=0.01)
  assert float(row['GFLOP/s']) > 0 and float(row['compile s']) > 0


def test_jaxlab_side_runs_without_tensorflow(tmp_path):
  rows = _run_benchmark(tmp_path, '--jax-only', '--half-precision',
                        '--models', 'cnn_bn', '--batch', '2',
                        block_tensorflow=True)
  assert sorted(rows) == ['cnn_bn']
  for row in rows.values():
    assert float(row['jaxlab img/s']) > 0
    assert row['PyTorch img/s'] == '-'


@pytest.mark.parametrize('device_kind,peak', [
    ('NVIDIA H100 80GB HBM3', 989.4), ('NVIDIA H100 PCIe', 756.0),
    ('NVIDIA H200', 989.4), ('NVIDIA H200 NVL', 835.5), ('cpu', None), ('TPU v5 lite', None)])
def test_datasheet_peak_takes_the_longest_matching_name(device_kind, peak):
  from benchmarks import train_step
  assert train_step.datasheet_tflops(device_kind, 'bfloat16') == peak
  assert train_step.datasheet_tflops(device_kind, 'float64') is None


def test_input_benchmark_compares_streaming_with_pytorch_dataloader():
  """benchmarks/input_pipeline.py on 24 small JPEGs, throughput only."""
  proc = subprocess.run(
      [sys.executable, 'benchmarks/input_pipeline.py', '--images', '24',
       '--size', '32', '--batch', '8', '--repeats', '1', '--workers', '1',
       '--skip-memory'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  header = lines.index('loader | img/s | img/s per core | / PyTorch')
  rows = [line.split(' | ') for line in lines[header + 1:header + 4]]
  assert [r[0].split(',')[0] for r in rows] == ['jaxlab', 'jaxlab',
                                                 'PyTorch DataLoader']
  assert all(float(r[1]) > 0 for r in rows)
  assert rows[2][3] == '1.00'  # Ratios are against PyTorch.
