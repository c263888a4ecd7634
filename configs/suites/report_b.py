"""Suite: all of report B, at learning rates 0.2 and 0.002, over seeds.

  python launch.py --config configs/suites/report_b.py --workdir runs/report_b \
      --config.data_path=DIR [--config.seeds=(0,1,2)]

The scratch variants and the five VGG16 freezing experiments, each at
lr 0.2 and at lr 0.002 with gradient-norm clipping at 0.5 (as the report's
code did), and the batch sizes 2, 6 and 10 with nothing frozen at lr 0.002.
DIR holds train/ and test/ (15-Scene); the VGG runs need the pretrained
weights (see configs/vgg_finetune.py). Report B saw: lr 0.2 gets stuck,
lr 0.002 learns; pretrained VGG16 with all features frozen has the lowest
validation loss (about 0.4); freezing the classifier is the worst of the
pretrained runs.
"""

import ml_collections

from jaxlab.suite import experiment

EXPERIMENTS = ('scratch', 'scratch_transforms', 'scratch_normalise',
               'scratch_dropout', 'vgg_freeze_first15', 'vgg_freeze_second15',
               'vgg_freeze_all', 'vgg_freeze_classifier', 'vgg_finetune')
LOW_LR = {'optimizer.learning_rate': 0.002, 'optimizer.grad_clip_norm': 0.5}


def get_config():
  config = ml_collections.ConfigDict()
  config.seeds = (0, 1, 2)
  config.data_path = ''  # Pre-split image folder; '': digits.
  config.experiments = (
      [experiment(f'{name}_lr0.2', f'configs/{name}.py') for name in
       EXPERIMENTS] +
      [experiment(f'{name}_lr0.002', f'configs/{name}.py', LOW_LR) for name in
       EXPERIMENTS] +
      [experiment(f'vgg_finetune_lr0.002_batch{b}', 'configs/vgg_finetune.py',
                  {**LOW_LR, 'batch_size': b}) for b in (2, 6, 10)])
  return config
