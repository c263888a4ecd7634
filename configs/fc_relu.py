"""Report A: fully connected net with ReLU, 129,600 -> 512 -> 256 -> 10.

  python launch.py --config configs/fc_relu.py --config.data.path=DIR
  (add --config.num_epochs=100 for the 100-epoch run)

Report A saw: train loss 2.06 / accuracy 0.30, test accuracy 0.21 after 50
epochs; 1.94 / 0.21, test 0.24 after 100. ReLU beats sigmoid.
SGD learning rate 0.01: not stated in the report.
"""

from configs import report_a_base


def get_config():
  config = report_a_base.get_config('fc')
  config.model.hidden = (512, 256)
  config.model.activation = 'relu'
  return config
