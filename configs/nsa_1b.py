"""Native Sparse Attention at the dense ladder's rung '1b': same parameter count, data and steps as
configs/dense_1b.py (see sparse_lm/ladder.py).

    python train.py --config=configs/nsa_1b.py --workdir=runs/nsa_1b

Plan for 8 devices (`python -m sparse_lm.compile --config=configs/nsa_1b.py --target=h100x8 --fit`):
gradient accumulation 4 (44.9 GiB on h100x8); it fits a TPU v5p 8-chip slice as shipped.
"""

from sparse_lm import ladder


def get_config():
  return ladder.nsa_config('1b')
