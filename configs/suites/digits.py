"""Suite: every model family on the offline digits, the README's table.

  python launch.py --config configs/suites/digits.py --workdir runs/digits

Report A's models (fully connected with ReLU and sigmoid, cnn1, cnn2,
cnn_bn, cnn_rmsprop), report B's scratch CNN at both learning rates and
ResNet-18 from scratch, all on scikit-learn's 1,797 digits at 32 x 32 (grey;
RGB for report B's model and ResNet-18), 5 epochs, 2 seeds; batch size and
optimizer as each experiment's config. About 3 minutes on 2 CPU cores.
The results are in the README's table.
"""

import ml_collections

from jaxlab.suite import experiment

DIGITS = {'data.path': '', 'data.image_size': 32, 'num_epochs': 5,
          'progress_bar': False}
GREY = {**DIGITS, 'data.channels': 1}


def get_config():
  config = ml_collections.ConfigDict()
  config.seeds = (0, 1)
  config.data_path = ''
  config.experiments = [
      *(experiment(name, f'configs/{name}.py', GREY)
        for name in ('fc_relu', 'fc_sigmoid', 'cnn1', 'cnn2', 'cnn_bn',
                     'cnn_rmsprop')),
      experiment('scratch_lr0.2', 'configs/scratch.py', DIGITS),
      experiment('scratch_lr0.002', 'configs/scratch.py',
                 {**DIGITS, 'optimizer.learning_rate': 0.002,
                  'optimizer.grad_clip_norm': 0.5}),
      experiment('resnet18_scratch', 'configs/resnet18_finetune.py',
                 {**DIGITS, 'model.pretrained': ''}),
  ]
  return config
