"""Run by tests/test_context.py in a process with 8 CPU devices: for each case given as JSON on argv
(attention, kernel, mesh.context, mesh.data, segments, seed[, overrides of model.<attention>]), the train
step's loss (auxiliary losses included), metrics and gradients of a tiny model
on one device and with each sequence split over the context axis; prints one JSON line per case."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_lm import sharding, trainer
from sparse_lm.attention import REGISTRY
from tests.conftest import tiny_config


def batch_for(segments: bool, seed: int, B: int = 2, T: int = 64) -> dict:
  rng = np.random.default_rng(seed)
  batch = {'inputs': rng.integers(0, 259, (B, T)).astype(np.int32),
           'targets': rng.integers(0, 259, (B, T)).astype(np.int32)}
  if segments:  # documents of 20, 44 and 20, 30, 14 tokens; positions restart at each
    seg = np.ones((B, T), np.int32)
    seg[:, 20:] = 2
    seg[1, 50:] = 3
    starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    pos = np.zeros((B, T), np.int32)
    for t in range(1, T):
      pos[:, t] = np.where(starts[:, t], 0, pos[:, t - 1] + 1)
    mask = np.ones((B, T), np.float32)
    mask[:, -3:] = 0
    batch.update(segment_ids=seg, positions=pos, loss_mask=mask)
  return batch


def case(attention: str, kernel: str, context: int, data: int, segments: bool, seed: int,
         overrides: dict | None = None) -> dict:
  c = tiny_config(attention=attention, kernel=kernel, **REGISTRY[attention].tiny_config())
  if overrides:
    c.model[attention].update(overrides)
  c.mesh.update(data=data, context=context)
  graphdef, params, model_state = nnx.split(trainer.Transformer(c.model, rngs=nnx.Rngs(seed)), nnx.Param, ...)
  params, model_state = nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
  batch = batch_for(segments, seed)

  def loss(params, batch):  # as the train step takes it: auxiliary losses and metrics too
    nll_BT, aux_loss, metrics, _ = trainer.forward(graphdef, params, batch, model_state, update_state=True)
    mask_BT = trainer.loss_mask(batch)
    return jnp.sum(nll_BT * mask_BT) / jnp.sum(mask_BT) + aux_loss, metrics
  (one_loss, one_metrics), one_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch)
  mesh = sharding.make_mesh(c.mesh)
  with jax.set_mesh(mesh):
    placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (split_loss, split_metrics), split_grads = step(params, placed)
    program = step.lower(params, placed).as_text()
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(one_grads)]
  diffs = [float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
           for a, b in zip(jax.tree.leaves(one_grads), jax.tree.leaves(split_grads), strict=True)]
  return {'case': [attention, kernel, context, data, segments], 'overrides': overrides or {},
          'loss_one': float(one_loss),
          'metrics_one': {k: float(v) for k, v in one_metrics.items()},
          'metrics_split': {k: float(v) for k, v in split_metrics.items()},
          'loss_split': float(split_loss), 'grad_rel_diff': max(diffs),
          'worst_grad': paths[int(np.argmax(diffs))],
          'permutes': program.count('collective_permute'),
          'gathers': program.count('all_gather'), 'reduce_scatters': program.count('reduce_scatter'),
          'tokens_split': placed['inputs'].sharding.spec[1]}


if __name__ == '__main__':
  for spec in json.loads(sys.argv[1]):
    print(json.dumps(case(*spec)), flush=True)
