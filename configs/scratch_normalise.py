"""Report B 2.3: `scratch_transforms` plus ImageNet normalisation.

  python launch.py --config configs/scratch_normalise.py --config.data.path=DIR

Per-channel mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), after
the transformations. Report B saw slightly worse results than without any
preprocessing.
"""

from configs import scratch_transforms
from jaxlab.preprocessing import IMAGENET_MEAN
from jaxlab.preprocessing import IMAGENET_STD


def get_config():
  config = scratch_transforms.get_config()
  config.data.mean = IMAGENET_MEAN
  config.data.std = IMAGENET_STD
  return config
