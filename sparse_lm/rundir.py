"""A run directory (`--workdir`): what counts as one, and what a rerun may change in it.

A run directory holds `config.json` (the resolved config, written once the run's state exists), its
checkpoints and its logs. Rerunning on it resumes, and before anything in it is written the new config is
compared with the saved one: a key that shapes the saved state or the data stream (the model, tokenizer,
optimizer, data source, seed, batch) must be unchanged, or the rerun is refused in one line; the keys in
`RESUMABLE` (how long, how often to evaluate, log and checkpoint, the learning-rate schedule, the mesh,
the kernels) may change and each change is reported.
"""

import fcntl
import json
import os
import pathlib
import socket

from sparse_lm.errors import ConfigError

# Keys (or sections, ending in '.') that a resumed run may change: none changes the shape of the saved
# state or the data stream. The learning-rate keys are here because lowering the rate and resuming is the
# answer to a diverging run.
RESUMABLE = (
    'train.steps', 'train.eval_every', 'train.eval_batches', 'train.log_every', 'train.on_nonfinite',
    'train.max_skipped_steps', 'train.grad_accum_steps', 'train.learning_rate', 'train.schedule',
    'train.warmup_steps', 'train.decay_fraction', 'train.min_lr_ratio', 'train.grad_clip',
    'checkpoint.', 'mesh.', 'data.read_threads', 'data.tfds_data_dir', 'data.tfds_download',
    'data.hf_download',
    'model.kernel', 'model.remat', 'model.remat_attention', 'model.dtype',
)
# What a run writes into its directory (and temporary files, named *.tmp*); a directory holding anything
# else is not a run.
RUN_FILES = frozenset({'config.json', 'metrics.jsonl', 'eval.jsonl', 'tensorboard', 'checkpoints',
                       'tokenizer.model', 'tokenizer.vocab', 'tokenizer.json', 'tokenizer_config.json',
                       'train.lock'})
LOCK_FILE = 'train.lock'


def read_config(workdir: pathlib.Path) -> dict | None:
  """The saved config of the run in `workdir`; None for a directory with no run yet (absent or empty, or
  holding only a run's files from a start that wrote no config). ConfigError for anything else."""
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f'--workdir={workdir} is a file; a run directory is a new or empty directory, or '
                      'one a previous run wrote')
  path = workdir / 'config.json'
  if not path.is_file():
    if workdir.is_dir():
      foreign = sorted(p.name for p in workdir.iterdir()
                       if p.name not in RUN_FILES and not p.name.endswith('.png') and '.tmp' not in p.name)
      if foreign:
        raise ConfigError(f'--workdir={workdir} is not a run directory (no config.json, and it holds '
                          f'{", ".join(foreign[:3])}{", ..." if len(foreign) > 3 else ""}); use a new '
                          'or empty directory')
    return None
  try:
    saved = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ConfigError(f'--workdir={workdir}: its config.json cannot be read ({error}); it is not a run '
                      'this code wrote') from None
  if not isinstance(saved, dict) or not {'model', 'data', 'train'} <= saved.keys():
    raise ConfigError(f'--workdir={workdir}: its config.json is not a run config (no model, data and '
                      'train sections)')
  return saved


def _flat(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def _resumable(key: str) -> bool:
  return any(key == k or (k.endswith('.') and key.startswith(k)) for k in RESUMABLE)


def resume_changes(workdir: pathlib.Path, saved: dict, config) -> list[str]:
  """The differences of `config` from the saved one, as 'key old -> new' lines, when every one is
  resumable; otherwise one ConfigError naming the others. A vocabulary size of 0 (taken from the
  tokenizer) is not compared: the tokenizer's key is."""
  old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
  if new.get('model.vocab_size') == 0:
    new['model.vocab_size'] = old.get('model.vocab_size', 0)
  missing = object()
  changed = {key: (old.get(key, missing), new.get(key, missing)) for key in sorted(old.keys() | new.keys())
             if old.get(key, missing) != new.get(key, missing)}

  def show(value):
    return '(absent)' if value is missing else json.dumps(value)
  lines = {key: f'{key} {show(a)} -> {show(b)}' for key, (a, b) in changed.items()}
  # A key this code added since the run was saved (or removed) takes its default: it cannot have shaped
  # the saved state unless its default does something, which a refusal could not fix either.
  refused = [line for key, line in lines.items()
             if not _resumable(key) and missing not in changed[key]]
  if refused:
    raise ConfigError(f'--workdir={workdir} holds a run these changes would break: {"; ".join(refused)}. '
                      'Use a new --workdir, or rerun with the saved values (its config.json)')
  return list(lines.values())


def lock(workdir: pathlib.Path):
  """Holds `train.lock` in `workdir` for as long as the returned file stays open (the process's life),
  or one ConfigError when another process holds it: two trainings on one directory would write over each
  other's checkpoints and logs. Where the filesystem has no locks, nothing is held."""
  handle = open(workdir / LOCK_FILE, 'a+', encoding='utf-8')  # held open on purpose
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or 'another process'
    handle.close()
    raise ConfigError(f'--workdir={workdir} is being trained by {holder}; wait for it to stop, or use '
                      'another --workdir') from None
  except OSError:  # a filesystem without flock (some network mounts)
    return handle
  handle.truncate(0)
  handle.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
  handle.flush()
  return handle


def write_config(workdir: pathlib.Path, config) -> None:
  """Replaces `config.json` whole (a kill mid-write leaves the old one)."""
  tmp = workdir / 'config.json.tmp'
  tmp.write_text(config.to_json_best_effort(indent=2) + '\n', encoding='utf-8')
  os.replace(tmp, workdir / 'config.json')


def truncate_metrics(workdir: pathlib.Path, step: int) -> None:
  """Drops the lines of `metrics.jsonl` past `step` (written before a kill, and about to be written
  again by the resumed run) and any line a kill cut short, so the file holds one line per logged step."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return
  kept = []
  for line in path.read_text(encoding='utf-8').splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and isinstance(row.get('step'), int) and row['step'] <= step:
      kept.append(line + '\n')
  tmp = workdir / 'metrics.jsonl.tmp'
  tmp.write_text(''.join(kept), encoding='utf-8')
  os.replace(tmp, path)
