"""What every kernel in this package decides the same way: interpret mode and which kernel body runs.

`interpret=None` means interpret mode exactly when the default backend is the CPU (INTERFACES.md).
`backend=None` picks the body for the platform: the Mosaic TPU body on TPU, the GPU body (Triton)
elsewhere; on CPU the GPU body runs interpreted unless a test asks for the TPU one.
"""

import jax
from jax.experimental.pallas import tpu as pltpu

BACKENDS = ('gpu', 'tpu')
IMPLEMENTATIONS = ('pallas', 'xla')


def resolve_interpret(interpret: bool | None) -> bool:
  return jax.default_backend() == 'cpu' if interpret is None else bool(interpret)


def resolve_backend(backend: str | None) -> str:
  if backend is None:
    return 'tpu' if jax.default_backend() == 'tpu' else 'gpu'
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r} is not one of {BACKENDS}')
  return backend


def check_implementation(implementation: str) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r} is not one of {IMPLEMENTATIONS}')


def interpret_param(interpret: bool, backend: str):
  """The `interpret=` argument of `pl.pallas_call`: TPU bodies interpret under `InterpretParams`,
  which raises on out-of-range block indices that plain interpret mode silently clamps."""
  if not interpret:
    return False
  return pltpu.InterpretParams() if backend == 'tpu' else True
