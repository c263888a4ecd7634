"""Report B 3.5: VGG16 with ImageNet weights, nothing frozen.

  python launch.py --config configs/vgg_finetune.py --config.data.path=DIR

The pretrained weights are torchvision's `vgg16-397923af.pth`, read from
$JAXLAB_CACHE (default ~/.cache/jaxlab); add
--config.model.download_pretrained=True to fetch it, or point
--config.model.pretrained at a copy (.pth, .safetensors, .h5, .msgpack).
The last classifier layer (`classifier.6`) is replaced by a new one for
the dataset's classes. Images are normalised with ImageNet's mean and std,
which the weights expect (not stated in the report).
Report B saw: lr 0.2 gets stuck; lr 0.002 learns. Batch sizes 2, 6 and 10
(--config.batch_size) were run with this config.
"""

from configs import report_b_base
from jaxlab.preprocessing import IMAGENET_MEAN
from jaxlab.preprocessing import IMAGENET_STD


def get_config():
  config = report_b_base.get_config('vgg16')
  config.model.pretrained = 'torchvision'
  config.model.widths = (64, 128, 256, 512, 512)
  config.model.classifier_width = 4096
  config.model.dropout_rate = 0.5
  config.data.mean = IMAGENET_MEAN
  config.data.std = IMAGENET_STD
  config.optimizer.frozen = ()
  return config
