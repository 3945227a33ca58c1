"""Sampling: decoding with the KV cache gives the same tokens as re-running the full forward pass."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sparse_lm import sample
from sparse_lm.model import Transformer
from tests.conftest import REPO, run_train, tiny_config

SMALL_NSA = {'cmp_block': 4, 'cmp_stride': 2, 'sel_block': 4, 'num_selected': 3, 'window': 5}


CASES = [(attention, extra, temperature, top_k)
         for attention, extra in (('dense', {}), ('sliding_window', {'window': 4}))
         for temperature, top_k in ((0.0, 0), (1.0, 0), (0.7, 20))]
CASES += [('nsa', {}, 0.0, 0), ('nsa', {}, 0.7, 20)]


@pytest.mark.parametrize('attention,extra,temperature,top_k', CASES)
def test_cached_sampling_equals_full_recompute(attention, extra, temperature, top_k):
  seed = int(np.random.default_rng().integers(1 << 30))
  cfg = tiny_config(attention=attention, **extra).model
  cfg.nsa.update(SMALL_NSA)
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  variables = (nnx.to_pure_dict(params),)
  prompt_BP = jax.random.randint(jax.random.key(seed), (2, 6), 0, 259)
  kwargs = {'temperature': temperature, 'top_k': top_k}
  key = jax.random.key(seed + 1)
  cached = sample.generate(graphdef, variables, prompt_BP, 12, key, use_cache=True, **kwargs)
  full = sample.generate(graphdef, variables, prompt_BP, 12, key, use_cache=False, **kwargs)
  assert cached.shape == (2, 12)
  np.testing.assert_array_equal(cached, full)


def test_non_causal_models_generate_from_exactly_the_text_so_far():
  """The papers' MoSA and routing look at the whole sequence: neither a cache nor a padded buffer can
  serve them, so each greedy step is the argmax at the last position of the model run on the prompt and
  the tokens generated so far, nothing after."""
  seed = int(np.random.default_rng().integers(1 << 30))
  cfg = tiny_config(attention='mosa').model  # routing takes the same path
  cfg.mosa.update(num_heads=4, sparsity=2)
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  variables = (nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
  tokens_BL = jax.random.randint(jax.random.key(seed), (2, 8), 0, 259)
  new_BN = sample.generate(graphdef, variables, tokens_BL, 3, jax.random.key(0), causal=False)
  for i in range(3):
    logits_BLV, _ = nnx.merge(graphdef, *variables)(tokens_BL)
    np.testing.assert_array_equal(new_BN[:, i], np.argmax(logits_BLV[:, -1], axis=-1))
    tokens_BL = np.concatenate([tokens_BL, new_BN[:, i:i + 1]], axis=1)


@pytest.mark.parametrize('model_flags', [(), ('--config.model.mlp=moe', '--config.model.moe.num_experts=4',
                                                '--config.model.moe.bias_update_rate=0.01')])
def test_sample_command_continues_the_prompt(tmp_path, model_flags):
  run_train(tmp_path, '--config.train.steps=10', *model_flags)
  out = subprocess.run(
      [sys.executable, '-m', 'sparse_lm.sample', f'--workdir={tmp_path}', '--prompt=ROMEO:',
       '--max_new_tokens=20', '--temperature=0'],
      cwd=REPO, capture_output=True, text=True, check=True, timeout=300).stdout
  assert 'step 10' in out
  assert out.splitlines()[1].startswith('ROMEO:')
