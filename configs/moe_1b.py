"""MoE ladder rung '1b': the dense rung's active size with fine-grained experts (see
sparse_lm/ladder.py, moe_config).

    python train.py --config=configs/moe_1b.py --workdir=runs/moe_1b
    python -m sparse_lm.flops --config=configs/moe_1b.py   # total and active parameters

Plan for 8 devices (`python -m sparse_lm.compile --config=configs/moe_1b.py --target=h100x8 --fit`):
data parallel, gradient accumulation 16 (62.5 GiB on h100x8); on a TPU v5p 8-chip slice add
`--config.train.grad_accum_steps=32`: 75.4 of 85.5 GiB (extrapolated; with 16 it needs 83.0, too close).
"""

from sparse_lm import ladder


def get_config():
  return ladder.moe_config('1b')
