"""The benchmarked models written with torch.nn, as independent references.

`TorchVGG16` and `TorchResNet` have torchvision's layouts and state-dict
keys (`features.0.weight`, ..., `classifier.6.bias`; `conv1.weight`,
`layer1.0.bn1.running_mean`, ..., `fc.bias`); they stand in for
torchvision's models, which have no CPU build here. The tests use them as
the references for ported weights.
"""

import torch
from torch import nn


class TorchVGG16(nn.Module):

  def __init__(self, num_classes=1000, widths=(64, 128, 256, 512, 512),
               classifier_width=4096):
    super().__init__()
    layers, channels = [], 3
    for width, depth in zip(widths, (2, 2, 3, 3, 3)):
      for _ in range(depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(True)]
        channels = width
      layers.append(nn.MaxPool2d(2, 2))
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(channels * 49, classifier_width), nn.ReLU(True),
        nn.Dropout(0.5), nn.Linear(classifier_width, classifier_width),
        nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(classifier_width, num_classes))
    # torchvision's initialisation, so activations keep a sane scale.
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        nn.init.normal_(m.bias, 0, 0.01)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.normal_(m.bias, 0, 0.01)

  def forward(self, x):
    x = self.avgpool(self.features(x))
    return self.classifier(torch.flatten(x, 1))


class _Block(nn.Module):
  """torchvision's BasicBlock (`bottleneck=False`) or Bottleneck (v1.5: the
  stride on the 3 x 3 convolution)."""

  def __init__(self, channels, width, stride, bottleneck):
    super().__init__()
    if bottleneck:
      shapes = ((channels, width, 1, 1), (width, width, 3, stride),
                (width, width * 4, 1, 1))
    else:
      shapes = ((channels, width, 3, stride), (width, width, 3, 1))
    for i, (cin, cout, k, s) in enumerate(shapes):
      setattr(self, f'conv{i + 1}',
              nn.Conv2d(cin, cout, k, s, padding=k // 2, bias=False))
      setattr(self, f'bn{i + 1}', nn.BatchNorm2d(cout))
    self.depth = len(shapes)
    out = shapes[-1][1]
    self.downsample = None
    if stride != 1 or channels != out:
      self.downsample = nn.Sequential(
          nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    self.out_channels = out

  def forward(self, x):
    y = x
    for i in range(1, self.depth + 1):
      y = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(y))
      if i < self.depth:
        y = torch.relu(y)
    shortcut = x if self.downsample is None else self.downsample(x)
    return torch.relu(y + shortcut)


class TorchResNet(nn.Module):
  """torchvision's ResNet: `TorchResNet((2, 2, 2, 2))` is ResNet-18,
  `TorchResNet((3, 4, 6, 3), bottleneck=True)` ResNet-50."""

  def __init__(self, stage_sizes, bottleneck=False, num_classes=1000,
               widths=(64, 128, 256, 512)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, widths[0], 7, 2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.maxpool = nn.MaxPool2d(3, 2, padding=1)
    channels = widths[0]
    for stage, (depth, width) in enumerate(zip(stage_sizes, widths)):
      blocks = []
      for block in range(depth):
        blocks.append(_Block(channels, width,
                             2 if stage and not block else 1, bottleneck))
        channels = blocks[-1].out_channels
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))
    self.fc = nn.Linear(channels, num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for stage in range(1, 5):
      x = getattr(self, f'layer{stage}')(x)
    return self.fc(torch.flatten(x.mean((2, 3)), 1))


def fc(num_classes, in_features, activation=nn.ReLU):
  return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 512), activation(),
                       nn.Linear(512, 256), activation(),
                       nn.Linear(256, num_classes))


def cnn2(num_classes, in_channels, size):
  flat = 64 * ((((size - 4) // 2) - 4) // 2) ** 2
  return nn.Sequential(
      nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3),
      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
      nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
      nn.Linear(flat, 256), nn.Linear(256, num_classes))


def cnn_bn(num_classes, in_channels, size):
  layers, channels = [], in_channels
  for i, width in enumerate((16, 16, 32, 32)):
    layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width),
               nn.ReLU()]
    channels = width
    if i % 2:
      layers.append(nn.MaxPool2d(3, 2, padding=1))
  side = (size + 1) // 2
  side = (side + 1) // 2
  return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * side * side, 256),
                       nn.ReLU(), nn.Linear(256, num_classes))


def scratch_cnn(num_classes, in_channels, size):
  side = ((size - 2) // 2 - 2) // 2
  return nn.Sequential(
      nn.Conv2d(in_channels, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(16, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
      nn.Linear(16 * side * side, num_classes))
