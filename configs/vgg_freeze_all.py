"""Report B 3.3: pretrained VGG16, all feature layers frozen.

  python launch.py --config configs/vgg_freeze_all.py --config.data.path=DIR

Frozen: all of torchvision's features, the 13 convolutions. Frozen parameters
get no gradient, no update and no optimizer state, and count in neither
gradient clipping nor the gradient norm. See configs/vgg_finetune.py for the
weights file and the learning rates.
Report B saw (lr 0.002): the best model, validation loss about 0.4, but it
overfits: train loss goes to 0 while validation stops improving after epoch 5.
"""

from configs import vgg_finetune


def get_config():
  config = vgg_finetune.get_config()
  config.optimizer.frozen = ('features',)
  return config
