"""Dense ladder rung '100k' (see sparse_lm/ladder.py for the shared recipe).

    python train.py --config=configs/dense_100k.py --workdir=runs/dense_100k
"""

from sparse_lm import ladder


def get_config():
  return ladder.dense_config('100k')
