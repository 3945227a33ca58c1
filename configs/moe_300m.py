"""MoE ladder rung '300m': the dense rung's active size with fine-grained experts (see
sparse_lm/ladder.py, moe_config).

    python train.py --config=configs/moe_300m.py --workdir=runs/moe_300m
    python -m sparse_lm.flops --config=configs/moe_300m.py   # total and active parameters

Plan for 8 devices (`python -m sparse_lm.compile --config=configs/moe_300m.py --target=h100x8 --fit`):
gradient accumulation 2 (51.7 GiB on h100x8); it fits a TPU v5p 8-chip slice as shipped.
"""

from sparse_lm import ladder


def get_config():
  return ladder.moe_config('300m')
