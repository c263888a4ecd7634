"""Report B 3.1: pretrained VGG16, the first 15 feature layers frozen.

  python launch.py --config configs/vgg_freeze_first15.py --config.data.path=DIR

Frozen: torchvision's features[0:15], the first 7 convolutions. Frozen
parameters get no gradient, no update and no optimizer state, and count in
neither gradient clipping nor the gradient norm. See configs/vgg_finetune.py
for the weights file and the learning rates.
Report B saw (lr 0.002): worse results than the untrained model.
"""

from configs import vgg_finetune


def get_config():
  config = vgg_finetune.get_config()
  config.optimizer.frozen = ('features[0:15]',)
  return config
