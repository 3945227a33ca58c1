"""Dense ladder rung '1b' (see sparse_lm/ladder.py for the shared recipe).

    python train.py --config=configs/dense_1b.py --workdir=runs/dense_1b
"""

from sparse_lm import ladder


def get_config():
  return ladder.dense_config('1b')
