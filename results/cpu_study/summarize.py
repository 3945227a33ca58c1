"""Markdown tables of the CPU study from the files `run.sh` writes (nothing here is typed in by hand).

    python results/cpu_study/summarize.py [--dir=results/cpu_study] > results/cpu_study/tables.md
"""

import argparse
import collections
import json
import pathlib
import statistics

import numpy as np
from scipy import stats

from sparse_lm import scaling


def _lines(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _interval(x) -> str:
  return f'[{x[0]:.3g}, {x[1]:.3g}]' if x else 'n/a'


def dense_table(runs: list[dict]) -> list[str]:
  out = ['| budget C | layers | d_model | N (total) | D (tokens) | tokens/param | eval loss (nats/token) | '
         'bits/byte |', '|---|---|---|---|---|---|---|---|']
  by_budget = collections.defaultdict(list)
  for r in runs:
    by_budget[r['budget']].append(r)
  for budget in sorted(by_budget):
    rows = sorted(by_budget[budget], key=lambda r: r['N'])
    best = min(r['loss'] for r in rows)
    for r in rows:
      loss = f'**{r["loss"]:.4f}**' if r['loss'] == best else f'{r["loss"]:.4f}'
      out.append(f'| {budget:.2g} | {r["num_layers"]} | {r["d_model"]} | {r["N"]:,} | {r["D"]:,} | '
                 f'{r["D"] / r["N"]:.0f} | {loss} | {r["bpb"]:.3f} |')
  return out


def fit_table(fit: dict) -> list[str]:
  iv = fit.get('intervals') or {}
  out = ['| constant | fit | 95% bootstrap interval |', '|---|---|---|']
  for k in ('E', 'A', 'B', 'alpha', 'beta'):
    out.append(f'| {k} | {fit[k]:.4g} | {_interval(iv.get(k))} |')
  alloc = fit['allocation']
  out.append('')
  out.append(f'Approach 3 allocation (C = 6ND): N_opt ~ C^{alloc["a"]:.3f}, D_opt ~ C^{alloc["b"]:.3f}.')
  a2 = fit.get('approach2') or {}
  if a2.get('a') is not None:
    iv2 = a2.get('intervals') or {}
    out.append(f'Approach 2 (parabola minima of {len(a2.get("budgets", []))} budgets): '
               f'N_opt ~ C^{a2["a"]:.3f} {_interval(iv2.get("a"))}, '
               f'D_opt ~ C^{a2["b"]:.3f} {_interval(iv2.get("b"))}.')
  else:
    out.append('Approach 2: fewer than two budgets had a convex parabola with its minimum; no exponents.')
  return out


def variant_table(fit: dict, runs: list[dict], leaks: list[dict]) -> list[str]:
  """Each variant placed on the fitted frontier, and beside the dense run of its own shape and budget
  (the comparison that needs no fitted law); the twin's own multiplier says how far the law's frontier
  sits from the runs actually made."""
  leak_of = {pathlib.Path(r['workdir']).name: r for r in leaks}
  run_of = {r['name']: r for r in runs}
  law = scaling.Law(**{k: fit[k] for k in ('E', 'A', 'B', 'alpha', 'beta')})
  fpt = scaling.FlopsModel(**fit['flops_per_token'])
  out = ['| run | N total | N active | C (FLOPs) | eval loss | loss - dense twin | compute multiplier | '
         '95% interval | gradient leak | perturbation leak |', '|---|---|---|---|---|---|---|---|---|---|']
  twins = {}
  for v in fit['variants']:
    r, leak = run_of[v['name']], leak_of.get(v['name'], {})
    twin = run_of.get('dense' + v['name'][len(v['variant']):])
    if twin:
      twins[twin['name']] = twin
    delta = f'{v["loss"] - twin["loss"]:+.4f}' if twin else 'n/a'
    out.append(f'| {v["name"]} | {r["N"]:,} | {r["N_active"]:,} | {v["C"]:.3g} | {v["loss"]:.4f} | {delta} | '
               f'{_multiplier(v["multiplier"])} | {_interval(v.get("interval"))} | '
               f'{leak.get("leak", float("nan")):.3g} | {leak.get("perturbation_leak", float("nan")):.3g} |')
  for name, twin in sorted(twins.items()):
    leak = leak_of.get(name, {})
    mult = scaling.compute_multiplier(law, twin['C'], twin['loss'], fpt)
    out.append(f'| {name} (dense twin) | {twin["N"]:,} | {twin["N_active"]:,} | {twin["C"]:.3g} | '
               f'{twin["loss"]:.4f} | 0 | {_multiplier(mult)} | | {leak.get("leak", float("nan")):.3g} | '
               f'{leak.get("perturbation_leak", float("nan")):.3g} |')
  return out


def seed_table(runs: list[dict], seeds: list[dict]) -> list[str]:
  """The dense twin (train.seed 0) again at train.seed 1, 2, ... (`dense_twin_seeds.jsonl`, in that
  order): init and data order change, the validation batches do not. The noise of one run."""
  rows = [{r['name']: r for r in runs}[seeds[0]['name']], *seeds]
  out = ['| train.seed | eval loss | bits/byte |', '|---|---|---|']
  out += [f'| {seed} | {r["loss"]:.4f} | {r["bpb"]:.3f} |' for seed, r in enumerate(rows)]
  losses = [r['loss'] for r in rows]
  out += ['', f'{rows[0]["name"]} over {len(rows)} seeds: mean {statistics.mean(losses):.4f}, standard '
              f'deviation {statistics.stdev(losses):.4f}, range {max(losses) - min(losses):.4f} nats.']
  return out


def _holm(p_values: dict[str, float], level: float = 0.05) -> set[str]:
  """The names whose null is rejected by Holm's step-down at family-wise `level`."""
  rejected = set()
  for rank, (name, p) in enumerate(sorted(p_values.items(), key=lambda item: item[1])):
    if p > level / (len(p_values) - rank):
      break
    rejected.add(name)
  return rejected


def seed_study_table(seed_runs: list[dict], dense_fit: dict | None) -> list[str]:
  """Each variant over its seeds against dense over its seeds at the same budget and size.

  Unpaired: the mean difference with a Welch 95% interval. Paired: a train.seed fixes the data order
  (and the validation batches) for every variant alike, and the per-seed noise is mostly shared (a bad
  order is bad for all), so the per-seed differences variant minus dense get a Student t 95% interval
  over seeds, its p-value, and how many seeds the variant was lower. "Resolved" when the interval
  excludes 0; "after Holm" when it still is with the family of all variants' tests held to 5%. The
  compute multiplier is paired the same way: per seed, the dense law's compute to reach the variant's
  loss over its compute to reach that seed's dense loss (so the law's level cancels and only its slope
  is used), times the dense run's budget over the variant's; geometric mean over seeds with a t 95%
  interval on its logarithm. With no `dense_fit` (runs in a setting the dense law was not fitted in)
  the multiplier is left out. Runs that carry a passkey accuracy add its mean over seeds.
  """
  by_variant = collections.defaultdict(dict)
  for r in seed_runs:
    by_variant[r['variant']][r['seed']] = r
  dense = by_variant.get('dense', {})
  if dense_fit:
    law = scaling.Law(**{k: dense_fit[k] for k in ('E', 'A', 'B', 'alpha', 'beta')})
    fpt = scaling.FlopsModel(**dense_fit['flops_per_token'])
  cells, p_values = {}, {}
  for name, rows in by_variant.items():
    seeds = sorted(set(rows) & set(dense))
    if name == 'dense' or len(rows) < 2 or len(seeds) < 2:
      continue
    dense_losses = [r['loss'] for r in dense.values()]
    losses = [r['loss'] for r in rows.values()]
    welch = stats.ttest_ind(losses, dense_losses, equal_var=False).confidence_interval(0.95)
    diff = np.array([rows[s]['loss'] - dense[s]['loss'] for s in seeds])
    paired = stats.ttest_1samp(diff, 0.0)
    ci = paired.confidence_interval(0.95)
    multiplier = 'n/a'
    if dense_fit:
      log_m = np.log([scaling.compute_multiplier(law, rows[s]['C'], rows[s]['loss'], fpt)
                      / scaling.compute_multiplier(law, dense[s]['C'], dense[s]['loss'], fpt) for s in seeds])
      m_ci = stats.ttest_1samp(log_m, 0.0).confidence_interval(0.95)
      multiplier = f'{np.exp(log_m.mean()):.3g} [{np.exp(m_ci.low):.3g}, {np.exp(m_ci.high):.3g}]'
    p_values[name] = float(paired.pvalue)
    delta = statistics.mean(losses) - statistics.mean(dense_losses)
    cells[name] = [
        f'{delta:+.4f} [{welch.low:+.4f}, {welch.high:+.4f}]',
        f'{diff.mean():+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]', f'{paired.pvalue:.3g}',
        f'{int((diff < 0).sum())}/{len(seeds)}',
        ('worse' if ci.low > 0 else 'better') if ci.low > 0 or ci.high < 0 else 'not resolved',
        multiplier]
  holm = _holm(p_values)
  passkey = any(r.get('passkey') is not None for r in seed_runs)
  out = ['| variant | causal | seeds | eval loss mean | std | minus dense [Welch 95%] | paired minus dense '
         '[t 95%] | p (paired) | seeds lower | resolved (paired)? | after Holm | paired multiplier [t 95%] |'
         + (' passkey accuracy |' if passkey else ''),
         '|---|---|---|---|---|---|---|---|---|---|---|---|' + ('---|' if passkey else '')]
  for name in sorted(by_variant, key=lambda v: (v != 'dense', v)):
    rows = by_variant[name]
    losses = [r['loss'] for r in rows.values()]
    spread = f'{statistics.stdev(losses):.4f}' if len(losses) > 1 else 'n/a'
    row = cells.get(name, ['0', '0', '', '', '', ''] if name == 'dense' else ['n/a'] * 6)
    after = ('yes' if name in holm else 'no') if name in cells else ''
    causal = 'yes' if next(iter(rows.values())).get('causal') else 'NO'
    keys = [r['passkey'] for r in rows.values() if r.get('passkey') is not None]
    row = row[:5] + [after, row[5]] + ([f'{statistics.mean(keys):.3f}' if keys else 'n/a'] if passkey else [])
    out.append(f'| {name} | {causal} | {len(rows)} | {statistics.mean(losses):.4f} | {spread} | '
               + ' | '.join(row) + ' |')
  seeds_from = sorted({r['variant'] for r in seed_runs if r.get('from')})
  if seeds_from:
    out += ['', f'Seed 0 of {", ".join(seeds_from)} is run.sh\'s run (variant_runs.jsonl: the same command, '
                'train.seed 0), not rerun.']
  return out


def _multiplier(m) -> str:
  return f'{m:.3g}' if isinstance(m, float) else str(m)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dir', default='results/cpu_study')
  d = pathlib.Path(parser.parse_args().dir)
  fit = json.loads((d / 'fit.json').read_text())
  runs = _lines(d / 'runs.jsonl')
  leaks = _lines(d / 'leaks.jsonl') if (d / 'leaks.jsonl').exists() else []
  seeds = _lines(d / 'dense_twin_seeds.jsonl') if (d / 'dense_twin_seeds.jsonl').exists() else []
  sections = [
      ('Dense isoFLOP runs (best of each budget in bold)',
       dense_table([r for r in runs if r['variant'] == 'dense'])),
      ('Dense fit', fit_table(fit)),
      ('Variants against the dense frontier', variant_table(fit, runs, leaks)),
  ]
  if seeds:
    sections.append(('Seed noise of the dense twin', seed_table(runs, seeds)))
  if (d / 'seed_runs.jsonl').exists():
    dense_fit = json.loads((d / 'dense_fit.json').read_text())
    sections.append(('Seeds per variant at 4e12 FLOPs (seeds.sh)',
                     seed_study_table(_lines(d / 'seed_runs.jsonl'), dense_fit)))
  if (d / 'long_runs.jsonl').exists():
    sections.append(('Sequences of 1,024 at 2e12 FLOPs, seeds per variant (long.sh)',
                     seed_study_table(_lines(d / 'long_runs.jsonl'), None)))
  for title, lines in sections:
    print(f'### {title}\n')
    print('\n'.join(lines))
    print()


if __name__ == '__main__':
  main()
