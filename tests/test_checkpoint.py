import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_lm.checkpoint import Checkpointer

jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO = pathlib.Path(__file__).resolve().parents[1]
TMP_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's name for a step still being written


def _mesh():
  return Mesh(np.array(jax.devices()), ('data',))


def _train_state(seed=0):
  mesh = _mesh()
  rows = 2 * mesh.size
  k_w, k_b = jax.random.split(jax.random.key(seed))
  params = {
      'w': jax.device_put(jax.random.normal(k_w, (rows, 4)), NamedSharding(mesh, P('data', None))),
      'b': jax.device_put(jax.random.normal(k_b, (4,), jnp.bfloat16), NamedSharding(mesh, P())),
  }
  return {'params': params, 'opt_state': optax.adamw(1e-3).init(params), 'step': jnp.int32(seed)}


def _on_one_device(shape):
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=one_device)


def _abstract(state, sharding_fn=lambda x: x.sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), state)


def _assert_same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_round_trip_restores_values_dtypes_and_requested_sharding(tmp_path):
  ckpt = Checkpointer(tmp_path, every_steps=1, keep=3)
  state = _train_state(seed=7)
  data_state = {'next_index': 123, 'worker': [1, 2], 'name': 'train'}
  assert ckpt.save(7, state, data_state)
  replicated = NamedSharding(_mesh(), P())
  # Like the live arrays, then onto a layout other than the saved one.
  for sharding_fn in (lambda x: x.sharding, lambda x: replicated):
    step, restored, restored_data = ckpt.restore(_abstract(state, sharding_fn))
    assert (step, restored_data) == (7, data_state)
    _assert_same(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
      assert got.sharding.is_equivalent_to(sharding_fn(want), got.ndim)
  ckpt.close()


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = Checkpointer('runs/x/checkpoints', every_steps=1, keep=1)
  state = _train_state(seed=3)
  assert ckpt.save(3, state, {'i': 1})
  ckpt.wait()
  _assert_same(ckpt.restore(_abstract(state))[1], state)
  ckpt.close()


def test_keeps_only_the_last_n(tmp_path):
  ckpt = Checkpointer(tmp_path, every_steps=1, keep=2)
  for step in range(1, 6):
    ckpt.save(step, {'x': jnp.full((3,), step)}, {'step': step})
  ckpt.wait()
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ['4', '5']


def test_saves_on_the_interval_or_when_forced_and_never_twice(tmp_path):
  ckpt = Checkpointer(tmp_path, every_steps=3, keep=5)
  state = {'x': jnp.zeros(2)}
  # Unlike orbax's default policy, the first step of a run is not saved off the interval.
  assert [s for s in range(1, 7) if ckpt.should_save(s)] == [3, 6]
  assert not ckpt.save(1, state, {})
  assert ckpt.save(3, state, {})
  assert ckpt.save(4, state, {}, force=True)
  assert not ckpt.save(4, state, {}, force=True)
  ckpt.close()
  ckpt = Checkpointer(tmp_path, every_steps=3, keep=5)
  assert ckpt.latest_step() == 4
  ckpt.close()


def test_async_save_keeps_values_when_source_is_donated_or_deleted(tmp_path):
  ckpt = Checkpointer(tmp_path, every_steps=1, keep=3, async_save=True)
  state = {'x': jnp.arange(1_000_000, dtype=jnp.float32), 'y': jnp.ones((1000, 10))}
  want = jax.tree.map(np.array, state)
  ckpt.save(1, state, {'step': 1})
  overwritten = jax.jit(lambda s: jax.tree.map(lambda a: a * 0 - 5, s), donate_argnums=0)(state)
  jax.block_until_ready(overwritten)
  for leaf in jax.tree.leaves(overwritten) + jax.tree.leaves(state):
    leaf.delete()
  ckpt.wait()
  _, restored, _ = ckpt.restore(jax.tree.map(lambda x: _on_one_device(x.shape), want))
  ckpt.close()
  _assert_same(restored, want)


def test_restore_returns_none_without_a_checkpoint(tmp_path):
  ckpt = Checkpointer(tmp_path / 'empty', every_steps=1, keep=1)
  assert ckpt.latest_step() is None
  assert ckpt.restore({'x': jax.ShapeDtypeStruct((2,), jnp.float32)}) is None
  ckpt.close()


def _save_steps_1_and_2(directory):
  ckpt = Checkpointer(directory, every_steps=1, keep=5)
  states = {step: _train_state(seed=step) for step in (1, 2)}
  for step, state in states.items():
    ckpt.save(step, state, {'step': step})
  ckpt.close()
  return states


def _assert_resumes_step_1(directory, state_1):
  ckpt = Checkpointer(directory, every_steps=1, keep=5)
  assert ckpt.latest_step() == 1
  step, restored, data_state = ckpt.restore(_abstract(state_1))
  ckpt.close()
  assert (step, data_state) == (1, {'step': 1})
  _assert_same(restored, state_1)


def test_interrupted_save_in_tmp_directory_is_not_picked(tmp_path):
  states = _save_steps_1_and_2(tmp_path)
  # What a kill before orbax's final rename leaves behind.
  (tmp_path / '2').rename(tmp_path / f'2{TMP_SUFFIX}')
  _assert_resumes_step_1(tmp_path, states[1])


def test_step_directory_without_commit_file_is_not_picked(tmp_path):
  states = _save_steps_1_and_2(tmp_path)
  # Orbax writes commit_success.txt last, just before the rename; a step directory without it was
  # never committed (e.g. a copy of the run interrupted half way), although orbax would list it.
  (tmp_path / '2' / 'commit_success.txt').unlink()
  with ocp.CheckpointManager(tmp_path) as manager:
    assert manager.all_steps() == [1, 2]
  _assert_resumes_step_1(tmp_path, states[1])
  ckpt = Checkpointer(tmp_path, every_steps=1, keep=5)
  with pytest.raises(FileNotFoundError):
    ckpt.restore(_abstract(states[2]), step=2)
  ckpt.close()


_KILLED_SAVER = textwrap.dedent('''
    import sys, time
    import jax
    jax.config.update('jax_num_cpu_devices', 4)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sparse_lm.checkpoint import Checkpointer

    mesh = Mesh(np.array(jax.devices()), ('data',))
    ckpt = Checkpointer(sys.argv[1], every_steps=1, keep=5)
    small = {'w': jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P('data')))}
    ckpt.save(1, small, {'step': 1})
    ckpt.wait()
    ckpt.save(2, {'w': jax.random.uniform(jax.random.key(0), (50_000_000,))}, {'step': 2})
    ckpt.wait()
    time.sleep(60)  # still alive when killed, so a finished step 2 is possible but not guaranteed
''')


def _step_2_bytes(directory):
  total = 0
  for root, _, files in os.walk(directory):  # skips directories that orbax renames under it
    if os.path.relpath(root, directory).startswith('2'):
      for name in files:
        with contextlib.suppress(FileNotFoundError):  # renamed away since it was listed
          total += os.stat(os.path.join(root, name)).st_size
  return total


def _kill_while_step_2_is_written(directory, timeout_s=60):
  """SIGKILLs the saver once step 2 holds 1 MB of its 200 MB, or once step 2 is finished."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-c', _KILLED_SAVER, str(directory)], env=env)
  deadline = time.monotonic() + timeout_s
  while not ((directory / '2').exists() or _step_2_bytes(directory) > 2**20):
    assert proc.poll() is None, f'saver exited early with {proc.returncode}'
    assert time.monotonic() < deadline, 'step 2 never started'
    time.sleep(0.001)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()


def test_killed_async_save_is_never_resumed_from(tmp_path):
  _kill_while_step_2_is_written(tmp_path)

  ckpt = Checkpointer(tmp_path, every_steps=1, keep=5)
  step = ckpt.latest_step()
  if step == 2:  # the write won the race; then it must be whole
    _, restored, data_state = ckpt.restore({'w': _on_one_device((50_000_000,))})
    np.testing.assert_array_equal(restored['w'], jax.random.uniform(jax.random.key(0), (50_000_000,)))
  else:
    assert step == 1
    # Saved over 4 devices, restored onto 1.
    _, restored, data_state = ckpt.restore({'w': _on_one_device((8, 4))})
    np.testing.assert_array_equal(restored['w'], np.arange(32.0).reshape(8, 4))
    assert restored['w'].sharding == _on_one_device(()).sharding
    # The run goes on: step 2 saves over what the killed save left behind.
    assert ckpt.save(2, {'w': jnp.ones(3)}, {'step': 2})
    ckpt.wait()
    assert ckpt.latest_step() == 2
  assert data_state == {'step': step}
  ckpt.close()
