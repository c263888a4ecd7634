"""ResNet-18 with torchvision's ImageNet weights, only the new head trains.

  python launch.py --config configs/resnet18_freeze_backbone.py

Frozen: everything but `fc` (the stem `conv1`/`bn1` and `layer1` to
`layer4`): no gradient, no update, no optimizer state, no part in gradient
clipping. As in PyTorch with `requires_grad=False`, the frozen BatchNorms
still normalise with each batch's statistics in training and update their
running statistics. Weights, data and optimizer as in
configs/resnet18_finetune.py.
"""

from configs import resnet18_finetune

BACKBONE = ('conv1', 'bn1', 'layer')  # Regexes from the start of a path.


def get_config(model: str = 'resnet18'):
  config = resnet18_finetune.get_config(model)
  config.optimizer.frozen = BACKBONE
  return config
