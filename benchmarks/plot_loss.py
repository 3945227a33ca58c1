"""Plots a run's training and evaluation loss from its `metrics.jsonl`.

    python benchmarks/plot_loss.py --workdir=runs/default --out=benchmarks/default_loss.png
"""

import json
import pathlib

import matplotlib
from absl import app, flags

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the headless backend)

_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'The run to plot.')
_OUT = flags.DEFINE_string('out', 'loss.png', 'Where the PNG goes.')
_BASELINE = flags.DEFINE_float('baseline', None, 'A horizontal reference line (e.g. unigram eval loss).')


def main(argv) -> None:
  del argv
  rows = [json.loads(line) for line in (pathlib.Path(_WORKDIR.value) / 'metrics.jsonl').open()]
  train = {r['step']: r['loss'] for r in rows if 'loss' in r}
  evals = {r['step']: r['eval_loss'] for r in rows if 'eval_loss' in r}
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(list(train), list(train.values()), label='train loss', lw=1)
  ax.plot(list(evals), list(evals.values()), 'o-', label='eval loss')
  if _BASELINE.value is not None:
    ax.axhline(_BASELINE.value, color='gray', ls='--', label='unigram (eval)')
  ax.set_xlabel('step')
  ax.set_ylabel('nats per token')
  ax.set_title(_WORKDIR.value)
  ax.legend()
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=120)


if __name__ == '__main__':
  app.run(main)
