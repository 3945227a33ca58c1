"""Adds to `seed_runs.jsonl` the seed-0 row of each variant that has seeds there but no seed 0, from
run.sh's `variant_runs.jsonl` (the same sweep command at train.seed 0), marked `"from"`.

    python results/cpu_study/seed_zero.py [--out=results/cpu_study]
"""

import argparse
import json
import pathlib


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='results/cpu_study')
  out = pathlib.Path(parser.parse_args().out)
  seed_path = out / 'seed_runs.jsonl'
  rows = [json.loads(line) for line in seed_path.read_text().splitlines() if line.strip()]
  have = {(r['variant'], r['seed']) for r in rows}
  variants = {r['variant'] for r in rows}
  added = [{**run, 'seed': 0, 'from': 'variant_runs.jsonl'}
           for run in map(json.loads, (out / 'variant_runs.jsonl').read_text().splitlines())
           if run['variant'] in variants and (run['variant'], 0) not in have]
  with seed_path.open('a') as f:
    f.writelines(json.dumps(r) + '\n' for r in added)
  names = sorted(r['variant'] for r in added) or 'no variant'
  print(f'{seed_path}: seed 0 of {names} from variant_runs.jsonl')


if __name__ == '__main__':
  main()
