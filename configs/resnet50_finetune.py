"""ResNet-50 with torchvision's ImageNet weights, fine-tuned end to end.

  python launch.py --config configs/resnet50_finetune.py

As configs/resnet18_finetune.py, with torchvision's `resnet50-0676ba61.pth`
(ImageNet-1K V1) and bottleneck blocks.
"""

from configs import resnet18_finetune


def get_config():
  return resnet18_finetune.get_config('resnet50')
