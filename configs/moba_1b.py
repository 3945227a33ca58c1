"""Mixture of Block Attention (MoBA) at the dense ladder's rung '1b'.

Same parameters as configs/dense_1b.py (the gate has none),
the same data and steps; `sparse_lm.ladder.to_moba` gives its settings at this size.

    python train.py --config=configs/moba_1b.py --workdir=runs/moba_1b

Plan for 8 devices (`python -m sparse_lm.compile --config=configs/moba_1b.py --target=h100x8 --fit`):
gradient accumulation 2 (57.5 GiB on h100x8); it fits a TPU v5p 8-chip slice as shipped.
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('1b', 'moba')
