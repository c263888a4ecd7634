"""ResNet-50 with torchvision's ImageNet weights, only the new head trains.

  python launch.py --config configs/resnet50_freeze_backbone.py

As configs/resnet18_freeze_backbone.py, for ResNet-50.
"""

from configs import resnet18_freeze_backbone


def get_config():
  return resnet18_freeze_backbone.get_config('resnet50')
