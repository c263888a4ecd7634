"""ResNet-18 with torchvision's ImageNet weights, fine-tuned end to end.

  python launch.py --config configs/resnet18_finetune.py

On the offline digits by default, rendered at 64 x 64 in RGB and normalised
with ImageNet's mean and std (what the weights expect); add
--config.data.path=DIR for an image folder. The weights are torchvision's
`resnet18-f37072fd.pth` (ImageNet-1K V1), read from $JAXLAB_CACHE (default
~/.cache/jaxlab): add --config.model.download_pretrained=True to fetch it
(SHA-256 checked), or point --config.model.pretrained at a copy (.pth or
.safetensors). `fc` is replaced by a new head for the dataset's
classes; every other layer, BatchNorm statistics included, starts from the
file. SGD with momentum 0.9, learning rate 0.01, batch 64, 5 epochs (our
choices; no report has these runs).

Expected: with the official weights, not measured here (this machine cannot
download them); from scratch (--config.model.pretrained='') see the README's
table.
"""

import ml_collections

from configs import default
from jaxlab.preprocessing import IMAGENET_MEAN
from jaxlab.preprocessing import IMAGENET_STD


def get_config(model: str = 'resnet18') -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.name = model
  config.model.pretrained = 'torchvision'
  config.model.widths = (64, 128, 256, 512)  # Per stage, as torchvision's.
  config.data.image_size = 64
  config.data.channels = 3
  config.data.mean = IMAGENET_MEAN
  config.data.std = IMAGENET_STD
  config.batch_size = 64
  config.num_epochs = 5
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  return config
