"""Installs, beside the packages, `sparse_lm_lm_eval.pth`: one line that Python's `site` runs at start-up,
registering the lm-eval model `sparse_lm` lazily (`sparse_lm_lm_eval.py`, a top-level module so that
start-up imports nothing else), so that
`lm_eval --model sparse_lm` works; lm-eval 0.4 has no plugin discovery of its own. A wheel carries it at
its root (`build_py`); an editable install (`pip install -e .`) writes it into the editable wheel."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = 'sparse_lm_lm_eval.pth'
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)


class BuildWithPth(build_py):
  def run(self):
    super().run()
    self.copy_file(SOURCE, os.path.join(self.build_lib, PTH))

  def get_outputs(self, include_bytecode=True):
    return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class _StrategyWithPth:
  """setuptools' editable strategy, writing the .pth into the wheel too."""

  def __init__(self, strategy):
    self.strategy = strategy

  def __call__(self, wheel, files, mapping):
    self.strategy(wheel, files, mapping)
    with open(SOURCE, 'rb') as f:
      wheel.writestr(PTH, f.read())

  def __enter__(self):
    self.strategy.__enter__()
    return self

  def __exit__(self, *exc):
    return self.strategy.__exit__(*exc)


class EditableWithPth(editable_wheel):
  def _select_strategy(self, *args, **kwargs):
    return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={'build_py': BuildWithPth, 'editable_wheel': EditableWithPth})
