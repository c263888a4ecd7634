"""Report A: fully connected net with sigmoid, 129,600 -> 512 -> 256 -> 10.

  python launch.py --config configs/fc_sigmoid.py --config.data.path=DIR
  (add --config.num_epochs=100 for the 100-epoch run)

Report A saw: the loss barely moves (2.30 after 50 epochs, 2.29 after 100;
vanishing gradients), test accuracy 0.03 and 0.23.
SGD learning rate 0.01: not stated in the report.
"""

from configs import fc_relu


def get_config():
  config = fc_relu.get_config()
  config.model.activation = 'sigmoid'
  return config
