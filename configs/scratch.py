"""Report B 2.1: the small CNN trained from scratch, no preprocessing.

  python launch.py --config configs/scratch.py --config.data.path=DIR
  (lr 0.002: add --config.optimizer.learning_rate=0.002
   --config.optimizer.grad_clip_norm=0.5)

Conv(3->16) ReLU MaxPool2, Conv(16->16) ReLU MaxPool2, Flatten (46,656 at
224 x 224), Dense 15. Report B saw: at lr 0.2 training gets stuck (loss
flat); at lr 0.002 it learns, with results that differ visibly from one
initialisation to another (four runs shown): run several seeds.
"""

from configs import report_b_base


def get_config():
  config = report_b_base.get_config('scratch_cnn')
  config.model.channels = (16, 16)
  config.model.dropout_rate = 0.0
  return config
