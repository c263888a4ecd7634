"""Report B 3.4: pretrained VGG16, the whole classifier frozen.

  python launch.py --config configs/vgg_freeze_classifier.py --config.data.path=DIR

Frozen: all of torchvision's classifier, the new random head included; only
the convolutions train. Frozen parameters get no gradient, no update and no
optimizer state, and count in neither gradient clipping nor the gradient norm.
See configs/vgg_finetune.py for the weights file and the learning rates.
Report B saw (lr 0.002): the worst of the pretrained runs, soon stuck like an
untrained model.
"""

from configs import vgg_finetune


def get_config():
  config = vgg_finetune.get_config()
  config.optimizer.frozen = ('classifier',)
  return config
