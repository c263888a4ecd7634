"""Runs one experiment: python launch.py --config configs/NAME.py [--workdir DIR].

Any config field can be overridden, e.g. --config.optimizer.learning_rate=0.002.
--summary prints the model's layer table and parameter counts, and exits.
A suite config (configs/suites/) runs all its experiments and seeds, then
writes a report into the workdir.
"""

import logging as std_logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TF is imported.

from jaxlab import runtime  # pylint: disable=g-import-not-at-top
from jaxlab import storage  # pylint: disable=g-import-not-at-top
from jaxlab.errors import UserError  # pylint: disable=g-import-not-at-top

try:
  runtime.apply_defaults()  # Before JAX starts: XLA flags, malloc, dispatch.
except UserError as e:
  print(f'error: {e}', file=sys.stderr)
  sys.exit(2)

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'configs', 'default.py')
config_flags.DEFINE_config_file(
    'config', None, f'Experiment config file (default: {DEFAULT_CONFIG}).',
    lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Folder for checkpoints, logs and results '
                    '(default: runs/<config file name>).')
flags.DEFINE_bool('summary', False,
                  'Print the layer table and parameter counts, then exit.')
flags.DEFINE_bool('distributed', False,
                  'Multi-host: call jax.distributed.initialize() first (the '
                  'three flags below, or detected on SLURM, Open MPI, TPU).')
flags.DEFINE_string('coordinator_address', None,
                    'With --distributed: host:port of process 0.')
flags.DEFINE_integer('num_processes', None,
                     'With --distributed: how many processes take part.')
flags.DEFINE_integer('process_id', None,
                     'With --distributed: this process, 0 .. num_processes-1.')


def _default_workdir() -> str:
  config_path = flags.FLAGS['config'].config_filename
  name = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  return os.path.join('runs', name)


_PROJECT = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax and other libraries; keeps their
  warnings and errors, as one line each."""

  def filter(self, record):
    if ((record.pathname.startswith(_PROJECT) and
         '/site-packages/' not in record.pathname) or
        '/clu/' in record.pathname):
      return True
    # A library's failure that matters reaches jaxlab as an exception, and
    # ends the run with its own message (a traceback where it is a bug); a
    # refused write (a checkpoint's, on a full disk) is reported once, so
    # the leftovers of orbax's failed writes are not logged again.
    if record.exc_info and storage.is_write_error(record.exc_info[1]):
      return False
    record.exc_info = record.exc_text = None
    return record.levelno >= std_logging.WARNING


def _log_unraisable_once(unraisable) -> None:
  """Exceptions nothing can catch (a library's callback after its event
  loop closed, as when a checkpoint write fails) as one warning line per
  message, not a traceback each."""
  message = f'{unraisable.exc_type.__name__}: {unraisable.exc_value}'
  if message not in _UNRAISABLE_SEEN:
    _UNRAISABLE_SEEN.add(message)
    logging.warning('Ignored in a background callback: %s', message)


_UNRAISABLE_SEEN = set()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _log_unraisable_once
  # Imported here, after flag parsing; --summary needs no TensorFlow.
  import jax  # pylint: disable=g-import-not-at-top
  from jaxlab import preemption  # pylint: disable=g-import-not-at-top
  cluster_flags = [f'--{name}' for name in ('coordinator_address',
                                             'num_processes', 'process_id')
                   if FLAGS[name].value is not None]
  if cluster_flags and not FLAGS.distributed:
    print(f'error: {" ".join(cluster_flags)} needs --distributed',
          file=sys.stderr)
    sys.exit(2)
  if FLAGS.distributed:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  runtime.configure()
  config = FLAGS.config
  is_suite = 'experiments' in config  # configs/suites/*: see jaxlab.suite.
  try:
    if FLAGS.summary:
      if is_suite:
        raise UserError('--summary takes an experiment config, not a suite')
      from jaxlab import summary  # pylint: disable=g-import-not-at-top
      print(summary.summarize_config(config).to_text())
      return
    workdir = FLAGS.workdir or _default_workdir()
    logging.info('JAX devices: %s; workdir: %s', jax.devices(), workdir)
    if is_suite:
      from jaxlab import suite  # pylint: disable=g-import-not-at-top
      suite.run_suite(config, workdir)
    else:
      from jaxlab import train  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(config, workdir)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except preemption.Preempted as e:
    print(f'stopped: {e}', file=sys.stderr)
    sys.exit(preemption.EXIT_STATUS)


_FLAG_ERRORS = (flags.Error, KeyError, ValueError, TypeError, AttributeError,
                OSError)


def _exit_with_flag_error(e: Exception, argv) -> None:
  # A misspelt key comes as a KeyError whose message spans lines ("Did you
  # mean ..."); a missing config file as a multi-line flags.Error.
  unknown_key = isinstance(e, KeyError) or (
      isinstance(e, AttributeError) and e.args and
      isinstance(e.args[0], KeyError))
  if unknown_key:
    e = e if isinstance(e, KeyError) else e.args[0]
  message = e.args[0] if unknown_key and e.args else str(e)
  message = ' '.join(str(message).replace("'", '').replace('"', '').split())
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  if unknown_key:
    message = (f'unknown config key {message} (config overrides: '
               f'{" ".join(overrides)})')
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_file(argv) -> str:
  """The --config file named in argv (without a `:argument`)."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1].split(':')[0]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1].split(':')[0]
  return DEFAULT_CONFIG


def _parse_flags(argv):
  """absl's parsing, with a bad config file or override as one line."""
  path = _config_file(argv)
  if not os.path.isfile(path):
    print(f'error: config file {path} does not exist; give a file such as '
          'configs/default.py', file=sys.stderr)
    sys.exit(2)
  try:
    argv = FLAGS(argv)
    FLAGS.config.keys()  # The config file loads lazily: load it here.
    return argv
  except _FLAG_ERRORS as e:
    _exit_with_flag_error(e, argv)
  except Exception as e:  # pylint: disable=broad-except
    # The config file's own code failed (a syntax error, a bad import).
    cause = e.__cause__ or e
    first_line = (str(cause).splitlines() or [''])[0]
    print(f'error: config file {path} does not load: '
          f'{type(cause).__name__}: {first_line}', file=sys.stderr)
    sys.exit(2)


def _with_default_config(argv: list[str]) -> list[str]:
  # Given as a flag default, the config file would be parsed (with any
  # overrides) when the flag is defined, before errors can be reported well.
  if any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    return argv
  return [argv[0], f'--config={DEFAULT_CONFIG}', *argv[1:]]


if __name__ == '__main__':
  app.run(main, argv=_with_default_config(sys.argv), flags_parser=_parse_flags)
