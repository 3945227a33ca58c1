"""Compiles a config's sharded train step (or one decoding step) for a GPU or TPU target that is not here.

    python -m sparse_lm.compile --config=configs/nsa_100m.py --target=h100x8 [--step=train|decode]
        [--memory_fraction=0.9] [--config.KEY=VALUE ...]
    python -m sparse_lm.compile --config=configs/nsa_1b.py --target=h100x8 --fit [--fit_compiles=24]

Targets: `h100`, `a100` (one GPU), `h100x8` (GPUs per host), `h100x8x2` (hosts), and TPU topologies
(`v5e:2x2`, `v5p:2x2x1`, `v6e:2x4`, ...). The config's `mesh.*` spans the target's devices. Prints one
JSON object: the target, devices and mesh, whether it compiled (else a one-line `error`), per-device
argument / output / temporary / peak bytes against the device's memory, `fits`, the compile time, and
every kernel call with the resources the compiler reports (sparse_lm/aot.py). Exit status 0 only when it
compiled and fits. A compile, not a run: nothing here says how fast the step is.

`--step=decode` compiles one cached decoding step of `train.batch_size` sequences with a cache of
`data.seq_len` positions. `fits` compares the peak with `--memory_fraction` of the device's memory
(JAX preallocates 75% on GPUs unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise).

`--fit` searches for a plan that fits instead (`sparse_lm/plan.py` says how it searches and ranks):
each tried plan's extrapolated peak goes to stderr, the chosen plan's overrides last; the JSON on stdout
holds its full-depth report and every tried plan.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile-only devices need no attached backend
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from sparse_lm import (  # noqa: E402
  aot,  # noqa: E402  (first: sets the environment the compile-only backends need)
  checks,
  cli,
  optim,
  sharding,
  tokenizer,
  trainer,
)
from sparse_lm import plan as plan_lib  # noqa: E402
from sparse_lm.errors import ConfigError  # noqa: E402
from sparse_lm.layers import AuxLoss  # noqa: E402

STEPS = ('train', 'decode')


def prepare(config: ml_collections.ConfigDict, target: aot.Target) -> jax.sharding.Mesh:
  """The config checked against the target (no data is read) and the mesh over its devices."""
  checks.check_model(config.model)
  checks.check_train(config, len(target.devices), target.num_hosts)
  if config.mesh.get('dcn_data', 1) * config.mesh.get('dcn_fsdp', 1) != 1:
    raise ConfigError('mesh.dcn_data / mesh.dcn_fsdp: multi-slice meshes are not compiled here; '
                      'compile one slice (both 1)')
  with config.unlocked():
    config.model.vocab_size = config.model.vocab_size or tokenizer.vocab_size_for(config)
  shape = sharding.mesh_shape(config.mesh, len(target.devices))
  return aot.make_mesh(target, shape, sharding.MESH_AXES)


def lower_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The train step exactly as `trainer.set_up` jits it, lowered on abstract inputs."""
  tx, schedule = optim.make_optimizer(config.train)
  graphdef, abstract_params, abstract_model_state = trainer.split_model(config.model)
  shardings = trainer.state_shardings(abstract_params, tx, mesh, abstract_model_state)
  state = trainer.abstract_state(config, tx, shardings)
  batch_sh = sharding.batch_sharding(mesh)
  rows = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), jnp.int32, sharding=batch_sh)
  step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, config.train.grad_accum_steps),
                 in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
  with jax.set_mesh(mesh):  # as sharding.on_mesh runs the step in training
    batch = {'inputs': rows, 'targets': rows}
    if config.data.packing != 'concat':  # document packing: the batch carries segments as training's does
      batch.update(segment_ids=rows, positions=rows, loss_mask=rows)
    return step.trace(state, batch).lower()


def lower_decode_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """One token for each of `train.batch_size` sequences against a cache of `data.seq_len` positions."""
  graphdef, abstract_params, abstract_model_state = trainer.split_model(config.model)
  params_sh = sharding.param_shardings(abstract_params, mesh)
  state_sh = sharding.param_shardings(abstract_model_state, mesh)
  params = trainer.placed(nnx.to_pure_dict(abstract_params), params_sh)
  model_state = trainer.placed(nnx.to_pure_dict(abstract_model_state), state_sh)
  B, S = config.train.batch_size, config.data.seq_len
  model = nnx.eval_shape(lambda: trainer.Transformer(config.model, rngs=nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: model.init_cache(B, S))
  cache_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim) if x.ndim and x.shape[0] == B
                          and B % _batch_devices(mesh) == 0 else sharding.replicated(mesh), cache)
  tokens = jax.ShapeDtypeStruct((B, 1), jnp.int32, sharding=sharding.batch_sharding(mesh)
                                if B % _batch_devices(mesh) == 0 else sharding.replicated(mesh))

  def decode(params, model_state, cache, tokens_B1):
    model = nnx.merge(graphdef, params, model_state)
    out, *_ = nnx.capture(model, nnx.Intermediate, AuxLoss)(tokens_B1, cache)
    return out

  step = jax.jit(decode, out_shardings=(None, cache_sh), donate_argnums=2)
  with jax.set_mesh(mesh):  # as sharding.on_mesh runs the step in training
    return step.trace(params, model_state, trainer.placed(cache, cache_sh), tokens).lower()


def _batch_devices(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def compile_config(config: ml_collections.ConfigDict, target_name: str, *, step: str = 'train',
                   memory_fraction: float = 0.9, kernel_cache: str | None = None) -> dict:
  """The report `python -m sparse_lm.compile` prints (a dict); raises ConfigError / TargetError on
  bad input. `kernel_cache`: `aot.compile_lowered`'s (GPU kernels reused between compiles)."""
  if step not in STEPS:
    raise ConfigError(f'--step={step!r} is not one of {STEPS}')
  if not 0 < memory_fraction <= 1:
    raise ConfigError(f'--memory_fraction={memory_fraction} must be in (0, 1]')
  target = aot.get_target(target_name)
  mesh = prepare(config, target)
  lowered = (lower_train_step if step == 'train' else lower_decode_step)(config, mesh)
  report = aot.compile_lowered(lowered, target, kernel_cache=kernel_cache)
  limit = int(memory_fraction * target.memory_bytes)
  fits = report.compiled and report.memory['peak_bytes'] <= limit
  return {'target': target.name, 'platform': target.platform, 'device_kind': target.devices[0].device_kind,
          'num_devices': len(target.devices), 'num_hosts': target.num_hosts, 'mesh': dict(mesh.shape),
          'step': step, 'compiled': report.compiled, 'error': report.error,
          'memory_per_device': report.memory, 'memory_limit_bytes': limit, 'fits': fits,
          'bytes_accessed_per_device': report.bytes_accessed, 'collectives': report.collectives,
          'compile_seconds': round(report.compile_seconds, 2), 'kernels': report.kernels,
          'kernel_calls': sum(k.get('calls', 1) for k in report.kernels)}


_CONFIG = cli.config_flag('compile')
_TARGET = flags.DEFINE_string('target', 'h100', f'What to compile for: {aot.target_names_help()}.')
_STEP = flags.DEFINE_string('step', 'train', f'Which step: one of {STEPS}.')
_FRACTION = flags.DEFINE_float('memory_fraction', 0.9, 'Share of device memory the step may use.')
_FIT = flags.DEFINE_bool('fit', False, 'Search for a plan (mesh, recomputation, gradient accumulation) '
                         'that fits the target, by compiling (sparse_lm/plan.py); prints its overrides.')
_FIT_COMPILES = flags.DEFINE_integer('fit_compiles', 24, 'With --fit: at most this many plans compiled '
                                     '(two reduced-depth compiles each), before the full-depth check.')


def fit(config: ml_collections.ConfigDict, target_name: str, *, memory_fraction: float = 0.9,
        max_compiles: int = 24, log=print) -> dict:
  """`plan.search` for the train step on a target: the plan that fits, its full report and every tried
  plan; raises ConfigError when none fits."""
  if not 0 < memory_fraction <= 1:
    raise ConfigError(f'--memory_fraction={memory_fraction} must be in (0, 1]')
  if max_compiles < 1:
    raise ConfigError(f'--fit_compiles={max_compiles} must be at least 1')
  target = aot.get_target(target_name)
  checks.check_model(config.model)
  with config.unlocked():
    config.model.vocab_size = config.model.vocab_size or tokenizer.vocab_size_for(config)
  limit = int(memory_fraction * target.memory_bytes)
  log(f'searching plans for {target.name} ({len(target.devices)} devices, {limit / aot.GIB:.1f} GiB each); '
      'peaks extrapolated from reduced depths:')
  def confirm_fn(c):
    return compile_config(c, target_name, memory_fraction=memory_fraction)
  # The reduced-depth compiles share their GPU kernels (the same layers at the same shapes): reused, the
  # second depth compiled in 4.2 s instead of 11.0 (nsa_1b on h100x8). The confirmation compiles afresh,
  # so that its report has every kernel's registers.
  with tempfile.TemporaryDirectory(prefix='sparse_lm_fit_') as scratch:
    def compile_fn(c):
      return compile_config(c, target_name, memory_fraction=memory_fraction,
                            kernel_cache=os.path.join(scratch, 'kernels'))
    return plan_lib.search(config, target, compile_fn, limit_bytes=limit, max_compiles=max_compiles, log=log,
                           confirm_fn=confirm_fn)


def main(argv) -> None:
  del argv
  if _FIT.value:
    if _STEP.value != 'train':
      sys.exit(f'fit error: --fit plans the train step; --step={_STEP.value} cannot be combined with it')
    try:
      found = fit(_CONFIG.value, _TARGET.value, memory_fraction=_FRACTION.value,
                  max_compiles=_FIT_COMPILES.value, log=lambda line: print(line, file=sys.stderr))
    except (ConfigError, aot.TargetError) as error:
      sys.exit(f'fit error: {error}')
    print(json.dumps(found, indent=2))
    print(f'plan for {_TARGET.value}: ' + ' '.join(found['overrides']), file=sys.stderr)
    return
  try:
    report = compile_config(_CONFIG.value, _TARGET.value, step=_STEP.value, memory_fraction=_FRACTION.value)
  except (ConfigError, aot.TargetError) as error:
    sys.exit(f'compile error: {error}')
  print(json.dumps(report, indent=2))
  if not report['fits']:
    reason = report['error'] or (f"needs {report['memory_per_device']['peak_bytes'] / aot.GIB:.2f} GiB per "
                                 f"device, more than {report['memory_limit_bytes'] / aot.GIB:.2f} GiB")
    sys.exit(f'compile {"failed" if report["error"] else "does not fit"}: {reason}')


if __name__ == '__main__':
  cli.run(main, 'compile')
