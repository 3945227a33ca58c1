"""Generates text from a run's newest checkpoint, decoding with a KV cache.

    python -m sparse_lm.sample --workdir=runs/default --prompt='def main(' [--max_new_tokens=200]
        [--temperature=0.8] [--top_k=40] [--seed=0] [--nouse_cache]

`--nouse_cache` re-runs the full forward pass for every new token instead; both give the same tokens.
"""

import sys

import jax
import jax.numpy as jnp
from absl import flags, logging
from flax import nnx

from sparse_lm import cli, trainer
from sparse_lm.errors import ConfigError
from sparse_lm.layers import AuxLoss
from sparse_lm.model import is_causal


def pick(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Greedy at temperature 0, else a draw from the (top-k truncated) tempered distribution."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(jnp.int32)


def generate(graphdef, variables, prompt_BP: jax.Array, num_new: int, key: jax.Array, *,
             temperature: float = 0.0, top_k: int = 0, use_cache: bool = True,
             causal: bool = True) -> jax.Array:
  """The `num_new` tokens that follow each prompt row; `variables` is what `nnx.merge(graphdef, ...)`
  takes (the parameters, and the non-parameter state where the model has some). Step i draws with
  `fold_in(key, i)` on every path, so the paths agree whenever their logits do.

  A model that is not causal (`model.is_causal`: the papers' MoSA and routing, expert-choice MoE) can
  neither decode from a cache nor see padding after its last token, so each step re-runs it on exactly
  the tokens so far (one compilation per length), whatever `use_cache` says."""
  if not causal:
    return _generate_exact(graphdef, variables, prompt_BP, num_new, key, temperature, top_k)
  fn = _generate_cached if use_cache else _generate_full
  return jax.jit(fn, static_argnums=(0, 3, 5, 6))(graphdef, variables, prompt_BP, num_new, key,
                                                  temperature, top_k)


def model_call(graphdef, variables):
  """The model as a function of (tokens, cache). Each call builds its own module, at the trace level
  of the loop body it runs in, because layers that sow training metrics write to their module; what
  they sow is dropped."""
  def call(tokens_BT, cache=None):
    out, *_ = nnx.capture(nnx.merge(graphdef, *variables), nnx.Intermediate, AuxLoss)(tokens_BT, cache)
    return out
  return call


def _generate_cached(graphdef, variables, prompt_BP, num_new, key, temperature, top_k):
  call = model_call(graphdef, variables)
  B, P = prompt_BP.shape
  logits_BPV, cache = call(prompt_BP, nnx.merge(graphdef, *variables).init_cache(B, P + num_new))

  def step(carry, i):
    logits_BV, cache = carry
    token_B = pick(logits_BV, jax.random.fold_in(key, i), temperature, top_k)
    logits_B1V, cache = call(token_B[:, None], cache)
    return (logits_B1V[:, 0], cache), token_B
  _, tokens_NB = jax.lax.scan(step, (logits_BPV[:, -1], cache), jnp.arange(num_new))
  return tokens_NB.T


def _generate_full(graphdef, variables, prompt_BP, num_new, key, temperature, top_k):
  call = model_call(graphdef, variables)
  B, P = prompt_BP.shape
  # A causal model's logits at position t ignore the still-empty slots after t, so one fixed-length
  # buffer serves every step.
  buffer_BL = jnp.concatenate([prompt_BP, jnp.zeros((B, num_new), jnp.int32)], axis=1)

  def step(i, buffer_BL):
    logits_BLV, _ = call(buffer_BL)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BLV, P + i - 1, axis=1, keepdims=False)
    token_B = pick(logits_BV, jax.random.fold_in(key, i), temperature, top_k)
    return jax.lax.dynamic_update_slice_in_dim(buffer_BL, token_B[:, None], P + i, axis=1)
  return jax.lax.fori_loop(0, num_new, step, buffer_BL)[:, P:]


def _generate_exact(graphdef, variables, prompt_BP, num_new, key, temperature, top_k):
  @jax.jit
  def step(variables, tokens_BL, i):
    logits_BLV, _ = model_call(graphdef, variables)(tokens_BL)
    return pick(logits_BLV[:, -1], jax.random.fold_in(key, i), temperature, top_k)
  tokens_BL = prompt_BP
  for i in range(num_new):
    tokens_BL = jnp.concatenate([tokens_BL, step(variables, tokens_BL, i)[:, None]], axis=1)
  return tokens_BL[:, prompt_BP.shape[1]:]


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  for name, value, low in (('max_new_tokens', _NUM_NEW.value, 1), ('temperature', _TEMPERATURE.value, 0),
                           ('top_k', _TOP_K.value, 0)):
    if value < low:
      sys.exit(f'sample: --{name}={value} must be at least {low}')
  try:
    run = trainer.load_run(_WORKDIR.value)
  except ConfigError as e:
    sys.exit(f'sample: {e}')
  # Documents start after an end-of-document token in training, so prompts do too.
  tok, causal = run.tok, is_causal(run.config.model)
  prompt_1P = jnp.asarray([[tok.eos_id, *tok.encode(_PROMPT.value)]], jnp.int32)
  new_1N = generate(run.graphdef, run.variables, prompt_1P, _NUM_NEW.value, jax.random.key(_SEED.value),
                    temperature=_TEMPERATURE.value, top_k=_TOP_K.value, use_cache=_USE_CACHE.value,
                    causal=causal)
  ids = [int(i) for i in new_1N[0]]
  if tok.eos_id in ids:
    ids = ids[:ids.index(tok.eos_id)]
  note = '' if causal else ', NOT causal: each token re-runs the model on the text so far'
  print(f'[{run.config.model.attention} model, step {run.step}{note}]')
  print(_PROMPT.value + tok.decode(ids))


if __name__ == '__main__':
  # Defined only for the command, so that modules importing the sampler (sparse_lm.evaluate) can
  # define flags of the same names.
  _WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'The run to sample from.')
  _PROMPT = flags.DEFINE_string('prompt', '', 'Text the generation continues.')
  _NUM_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.')
  _TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 for greedy decoding.')
  _TOP_K = flags.DEFINE_integer('top_k', 40, 'Sample among the k likeliest tokens; 0 for all.')
  _SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  _USE_CACHE = flags.DEFINE_bool('use_cache', True, 'Decode with the KV cache.')
  cli.run(main, 'sample')
