"""Report B 2.2: `scratch` with the report's "transformations".

  python launch.py --config configs/scratch_transforms.py --config.data.path=DIR

Random horizontal flip (p 0.5), random vertical flip (p 0.5) and random
rotation by up to 0.65 degrees (nearest neighbour, zero fill, as
torchvision's defaults), on training images only. Report B saw little
effect: curves near identical to one of the runs without them.
"""

from configs import scratch


def get_config():
  config = scratch.get_config()
  config.data.random_hflip = True
  config.data.random_vflip = True
  config.data.random_rotation = 0.65
  return config
