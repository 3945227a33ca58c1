"""Dense ladder rung '1b' (see sparse_lm/ladder.py for the shared recipe).

    python train.py --config=configs/dense_1b.py --workdir=runs/dense_1b

Plan for 8 devices (`python -m sparse_lm.compile --config=configs/dense_1b.py --target=h100x8 --fit`):
gradient accumulation 2 (57.3 GiB a device on h100x8); it fits a TPU v5p 8-chip slice as shipped.
"""

from sparse_lm import ladder


def get_config():
  return ladder.dense_config('1b')
