"""Report A: `cnn_bn` trained with RMSprop with momentum, equation (1).

  python launch.py --config configs/cnn_rmsprop.py --config.data.path=DIR
  (add --config.num_epochs=100 for the 100-epoch run)

  G_t = a G_{t-1} + (1 - a) g_t^2;  D_t = B D_{t-1} - lr / sqrt(G_t + eps) g_t

lr 0.01, a 0.99, eps 1e-8, B 0.9: not stated in the report. Report A saw the
worst test accuracy of all: 0.15 after 50 epochs, 0.22 after 100, with a
loss that rose and fell.
"""

from configs import cnn_bn


def get_config():
  config = cnn_bn.get_config()
  config.optimizer.name = 'rmsprop'
  config.optimizer.learning_rate = 0.01
  config.optimizer.alpha = 0.99
  config.optimizer.eps = 1e-8
  config.optimizer.momentum = 0.9
  return config
