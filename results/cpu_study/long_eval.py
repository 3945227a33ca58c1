"""Summarises long_eval.sh: per variant of the long setting (1,024 tokens, seeds 0-4), the RULER-style
suite's recall (decoded and by one parallel pass), the loss of its gold answers' tokens and the loss by
position, with 95% t-intervals over seeds and the difference from dense paired by seed (a seed fixes the
data order); the evaluation time per task; a plot of the loss by position (mean over seeds, the interval
shaded).

    python results/cpu_study/long_eval.py --root=runs/cpu_study/long --out=results/cpu_study
"""

import argparse
import collections
import json
import pathlib

import matplotlib
import numpy as np
from scipy import stats

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ('dense', 'nsa', 'moba', 'dsa')


def interval(values) -> str:
  values = np.asarray(values, float)
  if len(values) < 2:
    return f'{values.mean():.3f}' if len(values) else 'n/a'
  low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values)) \
      if values.std() > 0 else (values.mean(), values.mean())
  return f'{values.mean():.3f} [{low:.3f}, {high:.3f}]'


def collect(root: pathlib.Path) -> list[dict]:
  """One record per run with a position_loss and a ruler summary in its eval.jsonl."""
  runs = []
  for evals in sorted(root.glob('seed*/*_C*/eval.jsonl')):
    lines = [json.loads(x) for x in evals.read_text().splitlines() if x.strip()]
    position = [x for x in lines if x['task'] == 'position_loss']
    summary = [x for x in lines if x['task'] == 'ruler' and 'ruler_task' not in x]
    if not position or not summary or 'answer_loss_by_length' not in summary[-1]:
      continue  # not evaluated yet (or before the suite reported answer_loss)
    cells = [x for x in lines if x.get('ruler_task')][-len(summary[-1]['tasks']):]
    runs.append({'variant': evals.parent.name.split('_C')[0], 'seed': int(evals.parent.parent.name[4:]),
                 'buckets': position[-1]['buckets'], 'position_mean': position[-1]['mean_loss'],
                 'ruler': summary[-1]['score'],
                 'ruler_parallel': float(np.mean([c['score_parallel'] for c in cells])),
                 'tasks': {c['ruler_task']: c['score'] for c in cells},
                 'tasks_parallel': {c['ruler_task']: c['score_parallel'] for c in cells},
                 'answer_loss': float(np.mean([c['answer_loss'] for c in cells])),
                 'tasks_answer_loss': {c['ruler_task']: c['answer_loss'] for c in cells},
                 'seconds': {c['ruler_task']: c['seconds_decode'] + c['seconds_parallel'] for c in cells}})
  return runs


def paired(runs: list[dict], variant: str, key) -> str:
  """The variant minus dense, paired by seed, with a t-interval."""
  by_seed = {r['seed']: key(r) for r in runs if r['variant'] == 'dense'}
  diffs = [key(r) - by_seed[r['seed']] for r in runs if r['variant'] == variant and r['seed'] in by_seed]
  return interval(diffs) if diffs else 'n/a'


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--root', default='runs/cpu_study/long')
  parser.add_argument('--out', default='results/cpu_study')
  args = parser.parse_args()
  runs = collect(pathlib.Path(args.root))
  out = pathlib.Path(args.out)
  with open(out / 'long_eval.jsonl', 'w') as f:
    for r in runs:
      f.write(json.dumps(r) + '\n')
  variants = [v for v in ORDER if any(r['variant'] == v for r in runs)]
  by = collections.defaultdict(list)
  for r in runs:
    by[r['variant']].append(r)
  last = lambda r: r['buckets'][-1]['loss']  # noqa: E731
  answer = lambda r: r['answer_loss']  # noqa: E731
  lines = ['| variant | seeds | RULER recall, decoded [t 95%] | parallel pass | decoded minus dense '
           '(paired) | RULER answer loss (nats/token) | minus dense (paired) | loss, positions 664-1023 | '
           'minus dense (paired) | loss, all positions |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for v in variants:
    rs = by[v]
    lines.append(f'| {v} | {len(rs)} | {interval([r["ruler"] for r in rs])} | '
                 f'{interval([r["ruler_parallel"] for r in rs])} | '
                 f'{"" if v == "dense" else paired(runs, v, lambda r: r["ruler"])} | '
                 f'{interval([answer(r) for r in rs])} | {"" if v == "dense" else paired(runs, v, answer)} | '
                 f'{interval([last(r) for r in rs])} | {"" if v == "dense" else paired(runs, v, last)} | '
                 f'{interval([r["position_mean"] for r in rs])} |')
  tasks = list(runs[0]['tasks']) if runs else []
  lines += ['', 'Per task, mean over seeds: recall decoded / by the parallel pass / the answers\' loss '
            '(nats a token).', '', '| task | ' + ' | '.join(variants) +
            ' | seconds a run (decoded + parallel, 4 examples) |', '|---|' + '---|' * (len(variants) + 1)]
  for task in tasks:
    means = [f'{np.mean([r["tasks"][task] for r in by[v]]):.3f} / '
             f'{np.mean([r["tasks_parallel"][task] for r in by[v]]):.3f} / '
             f'{np.mean([r["tasks_answer_loss"][task] for r in by[v]]):.3f}' for v in variants]
    seconds = np.mean([r['seconds'][task] for r in runs])
    lines.append(f'| {task} | ' + ' | '.join(means) + f' | {seconds:.1f} |')
  (out / 'long_eval.md').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for v in variants:
    loss_SB = np.asarray([[b['loss'] for b in r['buckets']] for r in by[v]])
    x = [np.sqrt(max(b['start'], 1) * b['end']) for b in by[v][0]['buckets']]
    mean = loss_SB.mean(axis=0)
    ax.plot(x, mean, marker='o', markersize=3, label=f'{v} ({len(loss_SB)} seeds)')
    if len(loss_SB) > 1:
      half = stats.t.ppf(0.975, len(loss_SB) - 1) * stats.sem(loss_SB, axis=0)
      ax.fill_between(x, mean - half, mean + half, alpha=0.2)
  ax.set_xscale('log')
  ax.set_xlabel('position in the document (bytes, log scale)')
  ax.set_ylabel('mean loss (nats), 95% interval over seeds')
  ax.set_title('Loss by position, CPU study long setting (1,024 bytes)', fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / 'long_position_loss.png', dpi=100)


if __name__ == '__main__':
  main()
