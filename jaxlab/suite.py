"""Suites: several experiments, each over several seeds, then one report.

A suite config (see configs/suites/) has `experiments`, a list of
`experiment(name, config_file, overrides)` entries, and `seeds`. Every
(experiment, seed) trains in `WORKDIR/<name>/seed_<seed>` through the same
`train_and_evaluate` as a single run: finished runs are skipped, an
interrupted one resumes from its checkpoint, and a failing one is recorded
(`failed.json`) while the suite goes on. At the end `jaxlab.report` writes
the tables and figures into WORKDIR.
"""

import importlib.util
import os
import sys

import ml_collections
from absl import logging

from jaxlab import records
from jaxlab import preemption
from jaxlab import report
from jaxlab import storage
from jaxlab import train
from jaxlab import validation
from jaxlab.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name: str, config: str, overrides: dict | None = None) -> dict:
  """One suite entry: config file (relative to the repository) and overrides.

  Overrides use dotted keys, e.g. {'optimizer.learning_rate': 0.002}.
  """
  return {'name': name, 'config': config, 'overrides': dict(overrides or {})}


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as launch.py's --config would load it."""
  full = path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)
  if not os.path.isfile(full):
    raise UserError(f'config file {path} does not exist')
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # Config files import `configs.*`.
  spec = importlib.util.spec_from_file_location(
      'suite_' + os.path.basename(full)[:-3], full)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'config file {path} does not load: '
                    f'{type(e).__name__}: {e}') from None


def run_config(suite_config, entry: dict, seed: int) -> ml_collections.ConfigDict:
  """The locked config of one run of the suite."""
  config = load_config_file(entry['config'])
  overrides = dict(entry['overrides'], seed=seed)
  if suite_config.data_path:
    overrides['data.path'] = suite_config.data_path
  config.lock()  # An override may change values, not add keys.
  for key, value in overrides.items():
    try:
      config.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError):
      raise UserError(f'suite experiment {entry["name"]!r}: override {key!r} '
                      f'is not a key of {entry["config"]}') from None
    except (TypeError, ValueError) as e:
      raise UserError(f'suite experiment {entry["name"]!r}: override '
                      f'{key}={value!r} does not fit: {e}') from None
  return config


def _runs(suite_config) -> list[tuple[dict, int]]:
  names = [e['name'] for e in suite_config.experiments]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f'suite experiment names must be unique; repeated: '
                    f'{duplicates}')
  validation.check_seeds(suite_config.seeds)
  return [(e, seed) for e in suite_config.experiments
          for seed in suite_config.seeds]


def run_dir(workdir: str, name: str, seed: int) -> str:
  return os.path.join(workdir, name, f'seed_{seed}')


def run_suite(suite_config, workdir: str) -> list[dict]:
  """Runs every (experiment, seed) not yet finished, then writes the report.

  Returns one record per run: experiment, seed, status and error.
  """
  runs = _runs(suite_config)
  # Every run's config is built and checked first, so a typo or a value
  # that cannot be right fails before any training.
  configs = [run_config(suite_config, e, seed) for e, seed in runs]
  for (entry, _), config in zip(runs, configs):
    try:
      validation.check_config(config)
    except UserError as e:
      raise UserError(f'suite experiment {entry["name"]!r}: {e}') from None
  with storage.writing(workdir, None):
    os.makedirs(workdir, exist_ok=True)
  order = [{'experiment': e['name'], 'seed': seed,
            'dir': os.path.relpath(run_dir(workdir, e['name'], seed), workdir)}
           for e, seed in runs]
  records.write_json(os.path.join(workdir, 'suite.json'), order)
  outcomes = []
  for i, ((entry, seed), config) in enumerate(zip(runs, configs)):
    directory = run_dir(workdir, entry['name'], seed)
    logging.info('Suite run %d/%d: %s, seed %d, in %s', i + 1, len(runs),
                 entry['name'], seed, directory)
    failed = os.path.join(directory, records.FAILED)
    try:
      train.train_and_evaluate(config, directory)
    except (storage.WriteFailed, preemption.Preempted):
      # A full disk fails every run after it too; a stop asked for stops
      # the suite (the same command resumes it).
      raise
    except Exception as e:  # pylint: disable=broad-except
      # A broken run must not stop the others; its error is kept.
      message = str(e) if isinstance(e, UserError) else (
          f'{type(e).__name__}: {e}')
      logging.exception('Run %s seed %d failed: %s', entry['name'], seed,
                        message)
      os.makedirs(directory, exist_ok=True)
      records.write_json(failed, {'error': message})
      outcomes.append({'experiment': entry['name'], 'seed': seed,
                       'status': 'failed', 'error': message})
      continue
    if os.path.exists(failed):
      os.remove(failed)
    outcomes.append({'experiment': entry['name'], 'seed': seed,
                     'status': 'finished', 'error': ''})
  report.write_report(workdir)
  n_failed = sum(o['status'] == 'failed' for o in outcomes)
  logging.info('Suite finished: %d runs, %d failed; report in %s',
               len(outcomes), n_failed, os.path.join(workdir, 'report.md'))
  return outcomes
