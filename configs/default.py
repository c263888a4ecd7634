"""The default experiment: a fast demo on the offline handwritten digits.

`cnn_bn` (report A's CNN with BatchNorm) on scikit-learn's 1,797 digits
rendered at 32 x 32 in grey, SGD with momentum, 10 epochs: about a minute
on 2 CPU cores.

  python launch.py --config configs/default.py --workdir runs/default

Expected: test accuracy about 0.97 on the 180 test digits (chance: 0.10).

Every config builds on this one, so every config has these keys; the
experiment configs override some and add their model's and optimizer's
options (e.g. `model.activation`, `optimizer.alpha`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.name = 'cnn_bn'
  config.model.pretrained = ''   # Weights file, or 'torchvision' (vgg16).
  config.model.download_pretrained = False

  config.data = ml_collections.ConfigDict()
  config.data.path = ''          # Image folder; empty: the offline digits.
  config.data.tfds_name = ''     # A tensorflow-datasets dataset instead.
  config.data.data_dir = ''      # tfds data_dir; empty: tfds's default.
  config.data.download = False   # Let tfds download (needs network).
  config.data.image_key = 'image'
  config.data.label_key = 'label'
  config.data.image_size = 32    # Images are resized to size x size.
  config.data.channels = 1       # 1 grey, 3 RGB, 4 RGBA.
  config.data.split = (0.7, 0.2, 0.1)  # Train/val/test of unsplit data.
  config.data.split_seed = 0     # Same split whatever the training seed.
  config.data.skip_bad_images = False
  # Where the images live while training: 'memory' (decoded once), 'stream'
  # (decoded from disk batch by batch), or 'auto': memory if the decoded
  # splits fit memory_budget_gb (0: half of this machine's memory).
  config.data.cache = 'auto'
  config.data.memory_budget_gb = 0.0
  config.data.threads = 0        # Decoding threads per process; 0: one a core.
  config.data.workers = 0        # Decoding processes; 0: the training one.
  config.data.mean = ()          # Per-channel normalisation, e.g. ImageNet's.
  config.data.std = ()
  config.data.random_hflip = False   # Training-only augmentation.
  config.data.random_vflip = False
  config.data.random_rotation = 0.0  # Degrees, uniform in [-r, r].

  config.batch_size = 64         # Global, over all devices.
  config.eval_batch_size = 256
  config.num_epochs = 10
  config.seed = 0
  # bfloat16 computation, float32 parameters, optimizer and BatchNorm
  # statistics. GPUs, TPUs, and CPUs with AVX512-BF16 or AMX (oneDNN's
  # kernels); on other CPUs float32, with a warning (bfloat16 is slower).
  config.half_precision = False

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.grad_clip_norm = 0.0  # 0: no clipping.
  config.optimizer.frozen = ()   # Regexes over parameter paths.

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_epochs = 1
  # Also every N train steps, mid-epoch (0: off); a run resumed from one
  # ends exactly as an uninterrupted one.
  config.checkpoint.every_steps = 0
  config.checkpoint.keep = 3
  config.log_every_steps = 50    # Train loss to TensorBoard, console (0: off).
  config.progress_bar = True
  return config
