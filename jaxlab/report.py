"""Tables and figures over finished runs: `python -m jaxlab.report DIR`.

Finds every run under DIR (a folder with a `config.json`, or a suite's
`failed.json`), groups runs of
the same experiment over seeds (`DIR/<experiment>/seed_<n>/`, as suites lay
them out; any other run folder is an experiment of its own), and writes:

  DIR/report.md   report A's table (Model, Loss, Accuracy, Epochs, Acc on
                  test) as mean ± standard deviation over seeds, with
                  validation accuracy and trainable parameters; report B's
                  final train and validation losses; the failed runs
  DIR/report.csv  one row per run
  DIR/figures/    per experiment, train and validation loss per epoch;
                  overlays of all experiments (training accuracy,
                  validation accuracy, losses), mean line and ± 1 standard
                  deviation band over seeds (finished runs only)

The spread is the sample standard deviation (n - 1); with one seed it is
shown as '-'.
"""

import csv
import dataclasses
import io
import os
import re
import sys

import matplotlib
matplotlib.use('Agg')  # No display needed.
import matplotlib.ticker  # pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from jaxlab import records
from jaxlab import storage
from jaxlab.errors import UserError

_SEED_DIR = re.compile(r'^seed_(\d+)$')


@dataclasses.dataclass
class Run:
  experiment: str
  seed: int
  directory: str
  config: dict
  results: dict | None
  history: list[dict]
  error: str

  @property
  def status(self) -> str:
    if self.results is not None:
      return 'finished'
    return 'failed' if self.error else 'incomplete'


def find_runs(root: str) -> list[Run]:
  """Every run under `root`, in the suite's order when there is one."""
  runs = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d != 'checkpoints')
    if records.CONFIG not in files and records.FAILED not in files:
      continue
    rel = os.path.relpath(directory, root)
    parent, leaf = os.path.split(rel)
    seed_match = _SEED_DIR.match(leaf)
    config = records.read_config(directory) or {}
    experiment = (parent or os.path.basename(os.path.abspath(root))) \
        if seed_match else rel
    seed = int(seed_match.group(1)) if seed_match else config.get('seed', 0)
    failed = records.read_json(os.path.join(directory, records.FAILED))
    runs.append(Run(experiment, seed, directory, config,
                    records.read_results(directory),
                    records.read_history(directory),
                    (failed or {}).get('error', '')))
  suite = records.read_json(os.path.join(root, 'suite.json'))
  if suite:
    position = {}
    for i, entry in enumerate(suite):
      position.setdefault(entry['experiment'], i)
    runs.sort(key=lambda r: (position.get(r.experiment, len(position)),
                             r.experiment, r.seed))
  else:
    runs.sort(key=lambda r: (r.experiment, r.seed))
  return runs


def _group(runs: list[Run]) -> dict[str, list[Run]]:
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(run.experiment, []).append(run)
  return groups


def mean_std(values) -> tuple[float, float | None]:
  """Mean and sample standard deviation (None for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), (float(values.std(ddof=1))
                                if len(values) > 1 else None)


def _cell(values, digits: int = 4) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  mean, std = mean_std(values)
  spread = '-' if std is None else f'{std:.{digits}f}'
  return f'{mean:.{digits}f} ± {spread}'


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(' --- ' for _ in header) + '|']
  return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def _slug(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name)


def _curves(runs: list[Run], key: str) -> np.ndarray | None:
  """[seeds, epochs] of `key`, cut to the epochs every run has."""
  series = [[h[key] for h in r.history] for r in runs if r.history]
  if not series:
    return None
  epochs = min(len(s) for s in series)
  return np.asarray([s[:epochs] for s in series], np.float64)


def _plot_band(ax, curves: np.ndarray, label: str, color=None) -> None:
  epochs = np.arange(1, curves.shape[1] + 1)
  mean = curves.mean(0)
  line, = ax.plot(epochs, mean, label=f'{label} (n={len(curves)})',
                  color=color, marker='o' if len(epochs) <= 20 else None,
                  markersize=3)
  if len(curves) > 1:
    std = curves.std(0, ddof=1)
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2,
                    color=line.get_color())


def _save_figure(fig, path: str, **savefig_args) -> None:
  """Writes `fig` as a PNG file, and closes it."""
  png = io.BytesIO()  # Rendered first: the write's size is then known.
  fig.savefig(png, format='png', dpi=100, **savefig_args)
  plt.close(fig)
  storage.write_atomic(path, png.getvalue())


def _style(ax) -> None:
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)


def _loss_figure(name: str, runs: list[Run], path: str) -> bool:
  train, val = _curves(runs, 'train_loss'), _curves(runs, 'val_loss')
  if train is None:
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  _plot_band(ax, train, 'train loss')
  _plot_band(ax, val, 'validation loss')
  _style(ax)
  ax.set(xlabel='epoch', ylabel='cross-entropy loss', title=name)
  ax.legend()
  fig.tight_layout()
  _save_figure(fig, path)
  return True


_OVERLAYS = {
    'train_accuracy': 'training accuracy',
    'val_accuracy': 'validation accuracy',
    'train_loss': 'training loss',
    'val_loss': 'validation loss',
}


def _overlay_figure(key: str, groups: dict[str, list[Run]], path: str) -> bool:
  curves = {name: _curves(runs, key) for name, runs in groups.items()}
  curves = {k: v for k, v in curves.items() if v is not None}
  if not curves:
    return False
  fig, ax = plt.subplots(figsize=(8, 5))
  palette = plt.get_cmap('tab10' if len(curves) <= 10 else 'tab20').colors
  for i, (name, c) in enumerate(curves.items()):
    color = palette[i % len(palette)]
    _plot_band(ax, c, name, color=color)
  _style(ax)
  ax.set(xlabel='epoch', ylabel=_OVERLAYS[key],
         title=f'{_OVERLAYS[key]} per epoch, mean ± 1 s.d. over seeds')
  ax.legend(fontsize='small', loc='center left', bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  _save_figure(fig, path, bbox_inches='tight')
  return True


_CSV_FIELDS = ('experiment', 'seed', 'status', 'model', 'epochs', 'train_loss',
               'train_accuracy', 'val_loss', 'val_accuracy', 'test_loss',
               'test_accuracy', 'num_test_examples', 'trainable_params',
               'total_params', 'directory', 'error')


def _write_csv(runs: list[Run], path: str, root: str) -> None:
  text = io.StringIO()
  writer = csv.DictWriter(text, _CSV_FIELDS)
  writer.writeheader()
  for run in runs:
    row = {k: (run.results or {}).get(k, '') for k in _CSV_FIELDS}
    row.update(experiment=run.experiment, seed=run.seed, status=run.status,
               directory=os.path.relpath(run.directory, root),
               error=run.error)
    row['model'] = row['model'] or run.config.get('model', {}).get('name', '')
    writer.writerow(row)
  storage.write_atomic(path, text.getvalue())


def write_report(root: str) -> str:
  """Writes report.md, report.csv and figures/ into `root`; returns the
  markdown."""
  runs = find_runs(root)
  groups = _group(runs)
  finished = {name: [r for r in rs if r.results is not None]
              for name, rs in groups.items()}
  finished = {k: v for k, v in finished.items() if v}
  figures = os.path.join(root, 'figures')
  with storage.writing(figures, None):
    os.makedirs(figures, exist_ok=True)

  lines = [f'# Report: {os.path.basename(os.path.abspath(root))}', '',
           f'{len(runs)} runs of {len(groups)} experiments: '
           f'{sum(r.status == "finished" for r in runs)} finished, '
           f'{sum(r.status == "failed" for r in runs)} failed, '
           f'{sum(r.status == "incomplete" for r in runs)} incomplete. '
           'Cells are mean ± sample standard deviation over seeds; Loss and '
           'Accuracy are the last epoch\'s training figures.', '']
  rows = []
  for name, rs in finished.items():
    res = [r.results for r in rs]
    rows.append([name, str(res[0]['model']),
                 _cell([x['train_loss'] for x in res]),
                 _cell([x['train_accuracy'] for x in res]),
                 str(res[0]['epochs']),
                 _cell([x['test_accuracy'] for x in res]),
                 _cell([x['val_accuracy'] for x in res]),
                 f'{res[0]["trainable_params"]:,}', str(len(rs))])
  lines += ['## Results', ''] + _table(
      ['Experiment', 'Model', 'Loss', 'Accuracy', 'Epochs', 'Acc on test',
       'Val accuracy', 'Trainable params', 'Seeds'], rows) + ['']
  rows = [[name, _cell([r.results['train_loss'] for r in rs]),
           _cell([r.results['val_loss'] for r in rs]), str(len(rs))]
          for name, rs in finished.items()]
  lines += ['## Final train and validation loss', ''] + _table(
      ['Experiment', 'Train loss', 'Val loss', 'Seeds'], rows) + ['']

  problems = [r for r in runs if r.status != 'finished']
  if problems:
    lines += ['## Runs that did not finish', ''] + _table(
        ['Experiment', 'Seed', 'Status', 'Error'],
        [[r.experiment, str(r.seed), r.status, r.error.replace('|', '/')]
         for r in problems]) + ['']

  lines += ['## Figures', '']
  for key in _OVERLAYS:
    file = f'{key}.png'
    if _overlay_figure(key, finished, os.path.join(figures, file)):
      lines.append(f'![{_OVERLAYS[key]}](figures/{file})')
  lines.append('')
  for name, rs in finished.items():
    file = f'loss_{_slug(name)}.png'
    if _loss_figure(name, rs, os.path.join(figures, file)):
      lines.append(f'![{name}: loss](figures/{file})')
  text = '\n'.join(lines) + '\n'
  storage.write_atomic(os.path.join(root, 'report.md'), text)
  _write_csv(runs, os.path.join(root, 'report.csv'), root)
  return text


def main(argv: list[str]) -> None:
  if len(argv) != 2 or not os.path.isdir(argv[1]):
    sys.exit('usage: python -m jaxlab.report DIR  (a folder of finished runs)')
  try:
    write_report(argv[1])
  except UserError as e:
    sys.exit(f'error: {e}')
  print(f'wrote {os.path.join(argv[1], "report.md")}, report.csv and figures/')


if __name__ == '__main__':
  main(sys.argv)
