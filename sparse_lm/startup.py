"""Which JAX platform the commands use when the user does not say, and a quiet start on a CPU-only machine.

With the compile tier's packages installed (`[aot]`: libtpu and the CUDA plugin), JAX on a machine with
neither a GPU nor a TPU tries to start both and prints about 30 lines of plugin errors. Where no
accelerator device file exists and `JAX_PLATFORMS` is unset, the commands set it to `cpu`; a machine with
a GPU or TPU is left alone, so nothing here can hide one. Even with `cpu`, importing jaxlib loads the CUDA
plugin's kernels, whose stub logs "Could not find cuda drivers" three times before logging starts; on a
CPU-only machine those lines, and only those, are dropped from the import's stderr (and from the plugins'
registration, done here for the same reason).
"""

import contextlib
import glob
import os
import sys
import tempfile

# NVIDIA (/dev/nvidia0, ...), TPU v2-v4 (/dev/accel0), TPU v5 and later (/dev/vfio/0), AMD (/dev/kfd).
_ACCELERATOR_FILES = ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*', '/dev/kfd')
_CPU_ONLY_NOISE = ('Could not find cuda drivers on your machine',
                   'All log messages before absl::InitializeLog() is called are written to STDERR')


def has_accelerator() -> bool:
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


@contextlib.contextmanager
def _without_noise():
  """Runs the block with file descriptor 2 captured, then writes back every line but the known noise."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode('utf-8', errors='replace').splitlines(keepends=True)
      sys.stderr.write(''.join(line for line in lines if not any(n in line for n in _CPU_ONLY_NOISE)))
      sys.stderr.flush()


def choose() -> None:
  """Call before the first `import jax`: `JAX_PLATFORMS=cpu` where no accelerator is attached and the
  user set none, and jax imported without the CPU-only noise."""
  if 'jax' in sys.modules or has_accelerator():
    return
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  with _without_noise():
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    # Registering the plugins (it starts no backend, so jax.distributed.initialize may still follow)
    # loads the CUDA plugin's library, which logs the same line once more.
    xla_bridge._discover_and_register_pjrt_plugins()  # noqa: SLF001
