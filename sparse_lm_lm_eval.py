"""Registers the lm-eval model `sparse_lm` (`sparse_lm.harness.SparseLM`) when lm-eval's registry is
imported, without importing either before: run at every Python start-up by the `sparse_lm_lm_eval.pth`
this project installs (setup.py), it only adds an import hook, which costs nothing until `lm_eval` loads
(a module of its own, outside the `sparse_lm` package, whose import would load JAX)."""

import sys

_REGISTRY = 'lm_eval.api.registry'


class _AfterRegistry:
  """Wraps the loader of lm-eval's registry module so that, once it has run, `sparse_lm` is registered
  as a lazy placeholder (the class is imported only when lm-eval asks for the model)."""

  def find_spec(self, name, path=None, target=None):
    if name != _REGISTRY:
      return None
    sys.meta_path.remove(self)
    try:
      import importlib.util  # pylint: disable=g-import-not-at-top
      spec = importlib.util.find_spec(name)
    finally:
      sys.meta_path.insert(0, self)
    if spec is None or spec.loader is None:
      return None
    exec_module = spec.loader.exec_module

    def exec_and_register(module):
      exec_module(module)
      try:
        if 'sparse_lm' not in module.model_registry:
          module.model_registry.register('sparse_lm', target='sparse_lm.harness:SparseLM')
      except Exception:  # noqa: BLE001  # an lm-eval without this registry API: --model sparse_lm is unknown
        pass
    spec.loader.exec_module = exec_and_register
    return spec


if not any(isinstance(finder, _AfterRegistry) for finder in sys.meta_path):
  sys.meta_path.insert(0, _AfterRegistry())
