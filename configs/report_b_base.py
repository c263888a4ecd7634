"""Settings shared by report B's experiments (not an experiment itself).

Report B (15-Scene: 15 classes in train/ and test/ folders, test/ serving
as validation): RGB images resized to 224 x 224, SGD with momentum 0.9,
20 epochs, batch size 1, learning rate 0.2. The report's second setting is
learning rate 0.002 with gradient-norm clipping at 0.5, as its code did:

  --config.optimizer.learning_rate=0.002 --config.optimizer.grad_clip_norm=0.5

Batch sizes 2, 6 and 10 through --config.batch_size. Without
--config.data.path=DIR the experiments run on the offline digits rendered
at 224 x 224 in RGB.
"""

import ml_collections

from configs import default


def get_config(model: str = 'scratch_cnn') -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.name = model
  config.data.image_size = 224
  config.data.channels = 3
  config.batch_size = 1
  config.eval_batch_size = 32  # Evaluation only: no effect on results.
  config.num_epochs = 20
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.2
  config.optimizer.momentum = 0.9
  config.optimizer.grad_clip_norm = 0.0
  return config
