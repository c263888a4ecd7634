"""Report B 2.4: `scratch_normalise` plus dropout 0.25 before the Dense layer.

  python launch.py --config configs/scratch_dropout.py --config.data.path=DIR

Report B saw no improvement from dropout.
"""

from configs import scratch_normalise


def get_config():
  config = scratch_normalise.get_config()
  config.model.dropout_rate = 0.25
  return config
