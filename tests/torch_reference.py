"""An independent VGG16 written with torch.nn, in torchvision's layout.

Its state dict has torchvision's keys (`features.0.weight`, ...,
`classifier.6.bias`), so it stands in for torchvision's own VGG16, which has
no CPU build here.
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
