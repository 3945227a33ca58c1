"""DeepSeek Sparse Attention (DSA) at the dense ladder's rung '1b'.

Same parameter count as configs/dense_1b.py (a narrower MLP pays for the indexer),
the same data and steps; `sparse_lm.ladder.to_dsa` gives its settings at this size.

    python train.py --config=configs/dsa_1b.py --workdir=runs/dsa_1b

Plan for 8 devices (`python -m sparse_lm.compile --config=configs/dsa_1b.py --target=h100x8 --fit`):
gradient accumulation 4 (61.3 GiB on h100x8);
it fits a TPU v5p 8-chip slice as shipped (with `--config.model.dsa.block_size=64`, DSA's TPU route).
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('1b', 'dsa')
