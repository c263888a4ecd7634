"""Values that cannot be right fail before any slow work, in one line naming
the key, the value and the allowed range."""

import ml_collections
import pytest

from configs import cnn_rmsprop
from configs import default
from configs import scratch_dropout
from jaxlab import suite
from jaxlab import validation
from jaxlab.errors import UserError


@pytest.mark.parametrize('config_module,key,value,message', [
    (default, 'optimizer.learning_rate', -0.1,
     r'optimizer.learning_rate=-0.1 must be > 0'),
    (default, 'optimizer.learning_rate', 0.0, r'must be > 0'),
    (default, 'optimizer.momentum', 1.0,
     r'optimizer.momentum=1.0 must be in \[0, 1\)'),
    (default, 'optimizer.momentum', -0.5, r'in \[0, 1\)'),
    (cnn_rmsprop, 'optimizer.alpha', 1.0, r'optimizer.alpha=1.0 must be in '
     r'\(0, 1\)'),
    (cnn_rmsprop, 'optimizer.eps', 0.0, r'optimizer.eps=0.0 must be > 0'),
    (default, 'optimizer.grad_clip_norm', -1.0,
     r'optimizer.grad_clip_norm=-1.0 must be >= 0'),
    (scratch_dropout, 'model.dropout_rate', 1.0,
     r'model.dropout_rate=1.0 must be in \[0, 1\)'),
    (default, 'batch_size', 0, r'batch_size=0 must be an integer >= 1'),
    (default, 'eval_batch_size', -4, r'eval_batch_size=-4 must be'),
    (default, 'num_epochs', 0, r'num_epochs=0 must be an integer >= 1'),
    (default, 'checkpoint.every_epochs', 0, r'checkpoint.every_epochs=0'),
    (default, 'checkpoint.keep', 0, r'checkpoint.keep=0'),
    (default, 'checkpoint.every_steps', -1,
     r'checkpoint.every_steps=-1 must be an integer >= 0 \(0: off\)'),
    (default, 'log_every_steps', -5, r'log_every_steps=-5 must be'),
    (default, 'seed', -1, r'seed=-1 must be an integer >= 0'),
    (default, 'data.image_size', 4, r'data.image_size=4 must be an integer of '
     'at least 8'),
    (default, 'data.channels', 2, r'data.channels=2 is not supported'),
    (default, 'data.split', (0.7, 0.2, 0.2), r'data.split=\(0.7, 0.2, 0.2\) '
     r'must be three fractions'),
    (default, 'data.split', (0.0, 0.5, 0.5), r'train above 0'),
    (default, 'data.split', (1.2, -0.1, -0.1), r'in \[0, 1\]'),
    (default, 'data.random_rotation', -1.0,
     r'data.random_rotation=-1.0 must be >= 0'),
])
def test_values_out_of_range_are_named(config_module, key, value, message):
  config = config_module.get_config()
  validation.check_config(config)  # The config as shipped is fine.
  config.update_from_flattened_dict({key: value})
  with pytest.raises(UserError, match=message) as e:
    validation.check_config(config)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('seeds,message', [
    ((), 'seeds is empty'), ((0, -1), r'holds -1; seeds must be integers'),
    ((0, 1.5), 'holds 1.5'), ((1, 2, 1), r'repeats \[1\]')])
def test_bad_suite_seeds_are_named(seeds, message):
  with pytest.raises(UserError, match=message):
    validation.check_seeds(seeds)
  validation.check_seeds((0, 1, 2))


def test_suite_checks_every_run_before_training_any(tmp_path):
  config = ml_collections.ConfigDict(dict(
      seeds=(0,), data_path='', experiments=[
          suite.experiment('fine', 'configs/default.py', {'num_epochs': 1}),
          suite.experiment('bad', 'configs/default.py',
                           {'optimizer.momentum': 1.5})]))
  with pytest.raises(UserError, match=r"suite experiment 'bad': config "
                     r'optimizer.momentum=1.5 must be in \[0, 1\)'):
    suite.run_suite(config, str(tmp_path / 'suite'))
  assert not (tmp_path / 'suite').exists()
