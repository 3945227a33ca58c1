"""Trains a language model: `python train.py --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE]`.

Rerunning the same command on the same DIR resumes from its newest complete checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sparse_lm import trainer
from sparse_lm.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Where checkpoints and metrics go.')


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as error:
    sys.exit(f'config error: {error}')


if __name__ == '__main__':
  app.run(main)
