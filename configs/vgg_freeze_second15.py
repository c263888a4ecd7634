"""Report B 3.2: pretrained VGG16, the second 15 feature layers frozen.

  python launch.py --config configs/vgg_freeze_second15.py --config.data.path=DIR

Frozen: torchvision's features[15:30], the last 6 convolutions. Frozen
parameters get no gradient, no update and no optimizer state, and count in
neither gradient clipping nor the gradient norm. See configs/vgg_finetune.py
for the weights file and the learning rates.
Report B saw (lr 0.002): results similar to freezing the first 15 layers.
"""

from configs import vgg_finetune


def get_config():
  config = vgg_finetune.get_config()
  config.optimizer.frozen = ('features[15:30]',)
  return config
