"""Settings shared by report A's experiments (not an experiment itself).

Report A: 180 x 180 RGBA images of 10 classes split 70/20/10, batch 64, SGD
with a learning rate the report does not state (0.01 here), 50 epochs (and
100 with `--config.num_epochs=100`). Without `--config.data.path` the
experiments run on the offline digits rendered at the same size.
"""

import ml_collections

from configs import default


def get_config(model: str = 'cnn1') -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.name = model
  config.data.image_size = 180
  config.data.channels = 4
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 50
  config.optimizer.learning_rate = 0.01  # Not stated in the report.
  config.optimizer.momentum = 0.0        # Plain SGD; not stated either.
  return config
