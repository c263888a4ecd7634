"""Suite: all of report A, every model at 50 and 100 epochs, over seeds.

  python launch.py --config configs/suites/report_a.py --workdir runs/report_a \
      --config.data_path=DIR [--config.seeds=(0,1,2,3,4)]

Writes runs/report_a/<experiment>/seed_<n>/ and, at the end,
runs/report_a/report.md with report A's table (mean ± s.d. over seeds) and
figures. Without data_path the experiments run on the offline digits.
Report A saw (single runs): ReLU beats sigmoid; BatchNorm gives by far the
best test accuracy (0.68-0.69 vs about 0.40); RMSprop the worst (0.15 at 50
epochs, 0.22 at 100).
"""

import ml_collections

from jaxlab.suite import experiment

MODELS = ('fc_relu', 'fc_sigmoid', 'cnn1', 'cnn2', 'cnn_bn', 'cnn_rmsprop')


def get_config():
  config = ml_collections.ConfigDict()
  config.seeds = (0, 1, 2)
  config.data_path = ''  # Image folder for every experiment; '': digits.
  config.experiments = [
      experiment(f'{name}_{epochs}', f'configs/{name}.py',
                 {'num_epochs': epochs})
      for name in MODELS for epochs in (50, 100)]
  return config
