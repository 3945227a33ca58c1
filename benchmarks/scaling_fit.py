"""Time of `scaling fit`'s default fit (approach 3 from the 4500-point grid's 100 best points, 100
bootstrap refits, approach 2) on synthetic isoFLOP runs drawn from a known law with 2% noise.

    python benchmarks/scaling_fit.py [--points=240,20] [--bootstrap=100]

Per file: wall time of `fit_runs` (plots off), the fitted law and its bootstrap intervals.
"""

import time

import numpy as np
from absl import app, flags

from sparse_lm import scaling

_POINTS = flags.DEFINE_list('points', ['240', '20'], 'Runs per file: 240 (10 budgets x 24 sizes) or 20 '
                            '(4 budgets x 5 sizes).')
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 100, 'Bootstrap refits.')
TRUE = scaling.Law(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
SHAPES = {240: (np.geomspace(6e18, 3e21, 10), 24), 20: (np.geomspace(1e18, 1e20, 4), 5)}


def runs(points: int, seed: int) -> list[dict]:
  """Per budget, sizes from 1/8x to 8x the true optimum at C = 6ND, losses with 2% noise."""
  budgets, sizes = SHAPES[points]
  n_CS = TRUE.allocation(budgets)[0][:, None] * np.geomspace(1 / 8, 8, sizes)
  c_CS = np.broadcast_to(budgets[:, None], n_CS.shape)
  d_CS = c_CS / (6 * n_CS)
  loss_CS = TRUE.loss(n_CS, d_CS) * np.exp(np.random.default_rng(seed).normal(0, 0.02, n_CS.shape))
  return [dict(N=float(n), D=float(d), C=float(c), budget=float(c), loss=float(loss))
          for n, d, c, loss in zip(n_CS.ravel(), d_CS.ravel(), c_CS.ravel(), loss_CS.ravel(), strict=True)]


def main(argv) -> None:
  del argv
  for points in map(int, _POINTS.value):
    start = time.perf_counter()
    result = scaling.fit_runs(runs(points, seed=points), bootstrap=_BOOTSTRAP.value)
    seconds = time.perf_counter() - start
    law = ', '.join(f'{k}={result[k]:.5g}' for k in ('E', 'A', 'B', 'alpha', 'beta'))
    intervals = ', '.join(f'{k} [{lo:.4g}, {hi:.4g}]' for k, (lo, hi) in result['intervals'].items())
    print(f'{points} runs, {_BOOTSTRAP.value} refits: {seconds:.1f} s; {law}; objective '
          f'{result["objective"]:.6g}; {intervals}')


if __name__ == '__main__':
  app.run(main)
