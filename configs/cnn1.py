"""Report A: first CNN, two blocks of conv3x3-ReLU-conv3x3-ReLU-maxpool3x3/2.

  python launch.py --config configs/cnn1.py --config.data.path=DIR
  (add --config.num_epochs=100 for the 100-epoch run)

Channel counts 16, 16, 32, 32 and the hidden width 256 are not stated in
the report. Report A saw: test accuracy 0.06 after 50 epochs, 0.41 after 100.
"""

from configs import report_a_base


def get_config():
  config = report_a_base.get_config('cnn1')
  config.model.channels = (16, 16, 32, 32)
  config.model.hidden = 256
  return config
