"""What every command does with its command line before its own work: find the config file (from any
working directory), refuse an unknown `--config.KEY` with the closest key, and turn a flag error into one
line. Each failure exits with status 2 and one line `COMMAND: what is wrong; what is allowed`.

A config path is tried as given (relative to the working directory), then relative to the repository, so
`python /path/to/train.py --config=configs/nsa_1m.py` works from anywhere.
"""

import difflib
import importlib.util
import os
import pathlib
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = 'configs/default.py'


def fail(command: str, message: str, status: int = 2):
  """Exits with one line on stderr."""
  print(f'{command}: {message}', file=sys.stderr)
  sys.exit(status)


def _resolve_config_arg(argv: list[str]) -> str | None:
  """Rewrites `--config=X` (or `--config X`) in argv with X resolved; returns it (None: not given)."""
  for i, arg in enumerate(argv):
    if arg == '--':
      break
    if arg == '--config' and i + 1 < len(argv):
      argv[i:i + 2] = [f'--config={argv[i + 1]}']
    if argv[i].startswith('--config='):
      argv[i] = '--config=' + resolve_config_path(argv[i].removeprefix('--config='))
      return argv[i].removeprefix('--config=')
  return None


def resolve_config_path(spec: str) -> str:
  """`PATH[:ARG]` with PATH made absolute: as given, else relative to the repository; or ValueError."""
  path, sep, arg = spec.partition(':')
  for candidate in (pathlib.Path(path).expanduser(), REPO / path):
    if candidate.is_file():
      return str(candidate.resolve()) + sep + arg
  shipped = sorted(p.stem for p in (REPO / 'configs').glob('*.py'))
  close = difflib.get_close_matches(pathlib.Path(path).stem, shipped, n=3)
  hint = f'; did you mean {", ".join(f"configs/{c}.py" for c in close)}?' if close else (
      f'; the shipped configs are {REPO / "configs"}/*.py')
  where = os.getcwd() if pathlib.Path.cwd() == REPO else f'{os.getcwd()} or in {REPO}'
  raise ValueError(f'--config={spec}: no such file in {where}{hint}')


def _load_config(spec: str) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_checked_config', path)
  module = importlib.util.module_from_spec(module_spec)
  writes, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ beside a user's config
  try:
    module_spec.loader.exec_module(module)
  finally:
    sys.dont_write_bytecode = writes
  return module.get_config(arg) if arg else module.get_config()


def _keys(node, prefix: str = '') -> list[str]:
  keys = []
  for key, value in node.items():
    keys.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      keys += _keys(value, f'{prefix}{key}.')
  return keys


def _override_keys(argv: list[str]) -> list[str]:
  """The KEY of every `--config.KEY[=VALUE]` (and boolean `--noconfig.KEY`) before a `--`."""
  keys = []
  for arg in argv[1:]:
    if arg == '--':
      break
    name = arg.lstrip('-').partition('=')[0]
    for prefix in ('config.', 'noconfig.'):
      if arg.startswith('--') and name.startswith(prefix):
        keys.append(name.removeprefix(prefix).partition('[')[0])
  return keys


def check_overrides(config: ml_collections.ConfigDict, keys: list[str]) -> None:
  """ValueError naming the first key the config does not have, and the closest that it does."""
  known = _keys(config)
  for key in keys:
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
      hint = (f'did you mean --config.{close[0]}?' if close else
              'every key and its default is in sparse_lm/config.py')
      raise ValueError(f'--config.{key}: the config has no key {key!r}; {hint}')


def config_flag(command: str, default: str = DEFAULT_CONFIG):
  """Defines `--config` (a config file with `--config.KEY=VALUE` overrides) for `command`, after checking
  the file and the keys; exits with one line when either is wrong. Call it at import, where ml_collections
  reads the overrides from `sys.argv`."""
  try:
    resolved_default = resolve_config_path(default)
    spec = _resolve_config_arg(sys.argv) or resolved_default
    check_overrides(_load_config(spec), _override_keys(sys.argv))
  except ValueError as error:
    fail(command, str(error))
  return config_flags.DEFINE_config_file('config', resolved_default, 'Experiment config file.')


def run(main, command: str) -> None:
  """`app.run(main)` whose flag errors (a bad value, an unknown flag) are one line, and a Ctrl-C that
  `main` does not handle itself ends it with one line and status 130 instead of a traceback."""
  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as error:
      fail(command, f'{error} (--helpfull lists every flag)')

  def interruptible(argv):
    try:
      main(argv)
    except KeyboardInterrupt:
      fail(command, 'interrupted by Ctrl-C', status=130)
  app.run(interruptible, flags_parser=parse)
