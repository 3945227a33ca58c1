"""One compile of a config for a target in its own process, for the compile benchmarks (no flags here, so
each benchmark script defines its own)."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_compile(name: str, config: str, overrides: tuple[str, ...], target: str) -> dict:
  """`python -m sparse_lm.compile` in its own process: its JSON object, or its one-line error."""
  run = subprocess.run([sys.executable, '-m', 'sparse_lm.compile', f'--config={config}', f'--target={target}',
                        *overrides], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  if run.stdout.strip():
    return {'case': name, 'overrides': list(overrides), **json.loads(run.stdout)}
  return {'case': name, 'target': target, 'compiled': False, 'error': run.stderr.strip().splitlines()[-1]}
