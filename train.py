"""Trains a language model: `python train.py --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE]`.

Rerunning the same command on the same DIR resumes from its newest complete checkpoint. Ctrl-C (or
SIGTERM) saves a checkpoint at the next step boundary and stops; a second Ctrl-C stops at once. On many
hosts, run the same command on every host; `sparse_lm/distributed.py` says how each finds the others, and
`launch/` holds the launchers.
"""

import sys

from absl import flags, logging

from sparse_lm import cli, distributed, trainer
from sparse_lm.config import ConfigError
from sparse_lm.files import FormatError

_CONFIG = cli.config_flag('train')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Where checkpoints and metrics go.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', distributed.MODES,
    'auto: join a multi-process job when the flags or environment describe one; on: always (TPU pods); '
    'off: never.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Default: $JAX_NUM_PROCESSES.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Default: $JAX_PROCESS_ID.')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'initialization_timeout', 300, 'Seconds to wait for every process to join before failing.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 100, 'Seconds without a heartbeat after which a process counts as dead and '
    'the whole job fails.')


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  distributed.initialize(
      mode=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      initialization_timeout=_INIT_TIMEOUT.value, heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except FormatError as error:  # found while training: the newest checkpoint is kept
    sys.exit(f'train: data error: {error}')
  except ConfigError as error:
    sys.exit(f'config error: {error}')
  except trainer.Diverged as error:
    sys.exit(f'train: {error}')
  except trainer.Stopped as stop:
    sys.exit(stop.status)


if __name__ == '__main__':
  cli.run(main, 'train')
