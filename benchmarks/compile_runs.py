"""One compile of a config for a target in its own process, and the resumable JSON-lines file the compile
benchmarks keep their results in (no flags here, so each benchmark script defines its own)."""

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


def read_rows(path: pathlib.Path) -> list[dict]:
  """The compiles already recorded in `path` (none when it does not exist yet)."""
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def record(path: pathlib.Path, row: dict, *summary_keys: str) -> None:
  """Appends one compile to `path` at once (an interrupted sweep keeps it) and prints its summary."""
  print(json.dumps({k: row.get(k) for k in summary_keys}), flush=True)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('a') as f:
    f.write(json.dumps(row) + '\n')
