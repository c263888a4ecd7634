"""Suite: a tiny one to try suites with, about two minutes on 2 CPU cores.

  python launch.py --config configs/suites/tiny.py --workdir runs/tiny

Two experiments on the offline digits at 16 x 16 (report A's CNN with
BatchNorm, and its fully connected net), 2 epochs, 2 seeds each. Expected:
the CNN reaches a test accuracy around 0.9, the FC net around 0.8.
"""

import ml_collections

from jaxlab.suite import experiment

SMALL = {'data.image_size': 16, 'num_epochs': 2, 'progress_bar': False}


def get_config():
  config = ml_collections.ConfigDict()
  config.seeds = (0, 1)
  config.data_path = ''
  config.experiments = [
      experiment('cnn_bn', 'configs/default.py', SMALL),
      experiment('fc', 'configs/default.py',
                 {**SMALL, 'model.name': 'fc', 'optimizer.learning_rate': 0.01}),
  ]
  return config
