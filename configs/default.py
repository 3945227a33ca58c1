"""The default run: the ladder's ~1M-parameter dense model on the embedded corpus (the Python standard
library's own source files), about 5 minutes on 2 CPU cores.

    python train.py                      # this config, workdir runs/default
    python train.py --config=configs/default.py --workdir=/tmp/run --config.train.steps=100
"""

from sparse_lm import ladder


def get_config():
  c = ladder.dense_config('1m')
  c.train.steps = 600
  return c
