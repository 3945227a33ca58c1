"""The Mixture-of-Experts layer: it reduces to the dense FFN when its experts agree, its two execution
paths agree when nothing is dropped, drops are reported, the router learns and the balancing bias
balances, and whole MoE models train, on one device and expert-parallel on eight, to the same losses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm import attention, checks, flops, trainer
from sparse_lm.config import ConfigError
from sparse_lm.layers import AuxLoss
from sparse_lm.mlp import dense, moe
from sparse_lm.model import Transformer, mlp_name
from tests.conftest import run_train, tiny_config, train_losses


def make_layer(seed=0, **settings):
  cfg = tiny_config(mlp='moe').model
  cfg.moe.update(settings)
  return cfg, moe.Mlp(cfg, rngs=nnx.Rngs(seed))


def inputs(B=2, T=16, D=64, seed=1):
  return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


@nnx.jit(static_argnames='update_state')
def _capture(layer, x_BTD, update_state=False):
  return nnx.capture(layer, nnx.Intermediate, AuxLoss)(x_BTD, update_state=update_state)


def run(layer, x_BTD, update_state=False):
  """The layer's output and what it sowed (metrics and auxiliary losses), each sown value by its name."""
  y_BTD, *sown = _capture(layer, x_BTD, update_state)
  return y_BTD, {str(path[-1]): v.get_value()[0] for state in sown for path, v in nnx.to_flat_state(state)}


@nnx.jit
def grads(layer, x_BTD):
  return nnx.grad(lambda mdl: jnp.sum(jnp.square(nnx.capture(mdl, nnx.Intermediate)(x_BTD)[0] - 1.0)))(layer)


@pytest.mark.parametrize('execution', ['dropless', 'capacity'])
@pytest.mark.parametrize('score', ['softmax', 'sigmoid'])
def test_identical_experts_with_normalised_top_k_equal_the_dense_ffn(execution, score):
  cfg, layer = make_layer(execution=execution, score=score, capacity_factor=4.0, top_k=2)
  ffn = dense.Mlp(cfg, rngs=nnx.Rngs(3))
  E = cfg.moe.num_experts
  for name, w in (('expert_gate', ffn.w_gate), ('expert_up', ffn.w_up), ('expert_down', ffn.w_down)):
    getattr(layer, name)[...] = jnp.broadcast_to(w[...][None], (E,) + w.shape)
  x_BTD = inputs()
  np.testing.assert_allclose(run(layer, x_BTD)[0], ffn(x_BTD), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('router', ['token_choice', 'expert_choice'])
def test_dropless_equals_capacity_limited_when_capacity_suffices(router):
  # capacity_factor = E / k makes C = N: no expert can be given more assignments than tokens.
  _, drop_free = make_layer(router=router, execution='dropless', capacity_factor=4.0)
  _, limited = make_layer(router=router, execution='capacity', capacity_factor=4.0)
  x_BTD = inputs()
  y_free, sown_free = run(drop_free, x_BTD)
  y_lim, sown_lim = run(limited, x_BTD)
  np.testing.assert_allclose(y_free, y_lim, atol=1e-5, rtol=1e-5)
  assert float(sown_lim['dropped_fraction']) == 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               grads(drop_free, x_BTD), grads(limited, x_BTD))


def test_pallas_grouped_matmul_gives_the_reference_layer():
  x_BTD = inputs()
  _, reference = make_layer()
  _, kernel = make_layer()
  kernel.kernel = 'pallas'  # interpret mode on CPU
  np.testing.assert_allclose(run(kernel, x_BTD)[0], run(reference, x_BTD)[0], atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               grads(kernel, x_BTD), grads(reference, x_BTD))


def test_tiny_capacity_drops_tokens_and_reports_the_fraction():
  _, layer = make_layer(execution='capacity', capacity_factor=0.01, top_k=2)  # C = 1 slot per expert
  x_BTD = inputs()
  y_BTD, sown = run(layer, x_BTD)
  N, K = 32, 2
  experts_used = int(jnp.sum(sown['expert_load'] > 0))
  assert float(sown['dropped_fraction']) == pytest.approx(1 - experts_used / (N * K))
  # Every expert keeps one assignment, so at most E tokens get any output; the rest pass through.
  assert int(jnp.sum(jnp.any(y_BTD.reshape(N, -1) != 0, axis=-1))) <= experts_used


@pytest.mark.parametrize('settings', [dict(score='softmax'), dict(score='sigmoid'),
                                      dict(router='expert_choice'), dict(execution='capacity')])
def test_gradients_reach_the_router(settings):
  _, layer = make_layer(**settings)
  x_BTD = inputs()
  g = grads(layer, x_BTD)
  assert float(jnp.linalg.norm(g['router'][...])) > 1e-6
  assert float(jnp.linalg.norm(g['expert_gate'][...])) > 1e-6


def test_balancing_bias_moves_toward_balance_on_skewed_input():
  _, layer = make_layer(score='sigmoid', top_k=1, bias_update_rate=0.02, load_balance_weight=0.0)
  x_BTD = inputs(B=4, T=32) + 1.0  # every token shares a direction the router favours expert 0 along
  layer.router[...] = layer.router[...].at[:, 0].add(0.2)
  first_load = run(layer, x_BTD, update_state=True)[1]['expert_load']
  for _ in range(60):
    load = run(layer, x_BTD, update_state=True)[1]['expert_load']
  bias = layer.bias[...]
  assert float(first_load[0]) > 0.9, first_load
  assert float(jnp.max(load)) < 0.5 * float(first_load[0]), load
  assert float(bias[0]) < 0 and float(jnp.min(bias[1:])) > float(bias[0]), bias


def test_train_step_updates_the_bias_and_evaluation_leaves_it():
  config = tiny_config(mlp='moe', remat=True)  # the update must also cross nnx.remat
  config.model.moe.bias_update_rate = 0.01
  graphdef, _, _ = trainer.split_model(config.model)
  state = trainer.state_init_fn(config, trainer.optim.make_optimizer(config.train)[0])(jax.random.key(0))
  batch = {'inputs': jnp.arange(128, dtype=jnp.int32).reshape(2, 64) % 200,
           'targets': jnp.ones((2, 64), jnp.int32)}
  forward = jax.jit(trainer.forward, static_argnums=0, static_argnames='update_state')
  _, _, _, unchanged = forward(graphdef, state['params'], batch, state['model_state'])
  _, _, _, updated = forward(graphdef, state['params'], batch, state['model_state'], update_state=True)
  assert not np.any(unchanged['blocks'][0]['mlp']['bias'])
  assert np.all(np.abs(updated['blocks'][0]['mlp']['bias']) == pytest.approx(0.01))


@pytest.mark.parametrize('name', sorted(attention.REGISTRY))
def test_moe_composes_with_every_attention_variant(name):
  config = tiny_config(mlp='moe', attention=name, window=16)
  model = Transformer(config.model, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda mdl, t: nnx.capture(mdl, nnx.Intermediate)(t)[0][0])
  logits_BTV = forward(model, jnp.zeros((2, 64), jnp.int32))
  assert bool(jnp.all(jnp.isfinite(logits_BTV[..., :259])))


def test_interleaving_and_active_parameter_count():
  config = tiny_config(mlp='moe', num_layers=5)
  config.model.moe.update(first_dense=1, every=2, num_experts=8, top_k=2, granularity=0.5,
                          num_shared_experts=1)
  assert [mlp_name(config.model, i) for i in range(5)] == ['dense', 'moe', 'dense', 'moe', 'dense']
  model = Transformer(config.model, rngs=nnx.Rngs(0))
  assert [type(b.mlp) for b in model.blocks] == [dense.Mlp, moe.Mlp, dense.Mlp, moe.Mlp, dense.Mlp]
  counts = flops.param_counts(config.model)
  D, F = 64, 64  # expert width: granularity 0.5 of mlp_dim 128
  assert counts['total_params'] - counts['active_params'] == 2 * 6 * 3 * D * F  # 6 idle experts, 2 layers
  # Capacity buffers cost FLOPs (tests/test_flops.py), not active parameters: a token still needs k.
  config.model.moe.execution = 'capacity'
  assert flops.param_counts(config.model) == counts


@pytest.mark.parametrize('key, value', [
    ('num_experts', 0), ('top_k', 9), ('router', 'bogus'), ('score', 'relu'), ('execution', 'x'),
    ('capacity_factor', 0.0), ('granularity', 0.0), ('first_dense', 2), ('every', 0),
    ('load_balance_weight', -1.0), ('num_shared_experts', -1)])
def test_bad_moe_config_is_one_line_naming_the_key(key, value):
  config = tiny_config(mlp='moe')
  config.model.moe[key] = value
  with pytest.raises(ConfigError, match=rf'^model\.moe\.{key}=') as error:
    checks.check_model(config.model)
  assert '\n' not in str(error.value)


def test_experts_must_split_over_the_expert_axis():
  config = tiny_config(mlp='moe')
  config.model.moe.num_experts = 6
  config.mesh.expert = 4
  with pytest.raises(ConfigError, match=r'^model\.moe\.num_experts=6 must be a multiple of mesh\.expert=4'):
    checks.check_train(config, num_devices=8, process_count=1)


MOE_FLAGS = ('--config.model.mlp=moe', '--config.model.moe.num_experts=8', '--config.model.moe.top_k=2',
             '--config.model.moe.granularity=0.5', '--config.model.moe.num_shared_experts=1',
             '--config.model.moe.bias_update_rate=0.001', '--config.data.source=stdlib',
             '--config.train.steps=20', '--config.train.eval_every=20')


@pytest.fixture(scope='module')
def moe_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('moe')
  run_train(workdir, *MOE_FLAGS)
  return workdir


def test_moe_model_trains_on_the_embedded_corpus(moe_run):
  losses = train_losses(moe_run)
  assert losses[20] < losses[1] - 1.0, losses
  rows = [json.loads(line) for line in (moe_run / 'metrics.jsonl').read_text().splitlines()]
  last = [row for row in rows if 'loss' in row][-1]
  for key in ('expert_load_7', 'dropped_fraction', 'router_entropy', 'load_balance_loss', 'router_z_loss'):
    assert f'blocks/1/mlp/{key}' in last, sorted(last)
  assert last['aux_loss'] > 0


def test_expert_parallel_on_eight_devices_matches_one_device(moe_run, tmp_path):
  """Experts over 4 devices, parameters and batch ZeRO-3 style over the other 2 (fsdp)."""
  run_train(tmp_path, *MOE_FLAGS, '--config.mesh.fsdp=2', '--config.mesh.expert=4', devices=8)
  sharded, single = train_losses(tmp_path), train_losses(moe_run)
  assert sorted(sharded) == sorted(single)
  for step, loss in single.items():
    assert sharded[step] == pytest.approx(loss, rel=2e-4, abs=2e-4), step


def test_moe_with_split_sequences_matches_one_device(moe_run, tmp_path):
  """Each device routes its part of every row (`mesh.context`). It crashed before: the routing took whole
  rows while the tokens were split."""
  run_train(tmp_path, *MOE_FLAGS, '--config.mesh.context=4', '--config.mesh.data=2', devices=8)
  sharded, single = train_losses(tmp_path), train_losses(moe_run)
  assert sorted(sharded) == sorted(single)
  for step, loss in single.items():
    assert sharded[step] == pytest.approx(loss, rel=2e-4, abs=2e-4), step


def test_expert_parallel_with_the_kernel_config_matches_one_device(moe_run, tmp_path):
  """`model.kernel=pallas` with experts over a shard_map: it crashed before (the kernel's output had no
  manual-axis type). JAX's interpreter cannot run under shard_map, so on the CPU the reference runs
  there (`pallas_kernels._common.in_shard_map`); the compiled kernel in it is checked by the compile
  tier (tests/test_compile.py, MoE on h100x8 and a TPU v5e 8-chip slice)."""
  run_train(tmp_path, *MOE_FLAGS, '--config.model.kernel=pallas', '--config.mesh.fsdp=2',
            '--config.mesh.expert=4', devices=8)
  sharded, single = train_losses(tmp_path), train_losses(moe_run)
  assert sorted(sharded) == sorted(single)
  for step, loss in single.items():
    assert sharded[step] == pytest.approx(loss, rel=2e-4, abs=2e-4), step
