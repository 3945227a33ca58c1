"""The variant contract (`sparse_lm/attention/base.py`, `sparse_lm/mlp/base.py`), checked for every
registered variant: a variant is tested by being registered. Each runs in a tiny model under its own
`tiny_config()`: causality (an exact zero through gradients, or flagged and measured by the perturbation
probe), cached decoding equal to the parallel pass where it decodes, the `pallas` path equal to the
`xla` path, FLOP hooks that name real parameters, and config errors in one line naming the key. A
throwaway variant, registered by one line, goes through the same checks and a training step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sparse_lm import attention, checks, config, evaluate, flops, mlp, sample, trainer
from sparse_lm.attention import base
from sparse_lm.errors import ConfigError
from sparse_lm.layers import param
from sparse_lm.model import Transformer, is_causal
from tests.conftest import (
  CORPUS_FILE,
  assert_decoding_equals_parallel,
  assert_same_loss_and_grads,
  fresh_seed,
  tiny_config,
)

ATTENTION = sorted(attention.REGISTRY)
MLP = sorted(mlp.REGISTRY)


def variant_config(name: str, kind: str = 'attention', **model):
  variant = (attention if kind == 'attention' else mlp).REGISTRY[name]
  return tiny_config(**{kind: name}, **variant.tiny_config(), **model)


def _model(c, seed=None):
  return Transformer(c.model, rngs=nnx.Rngs(fresh_seed() if seed is None else seed))


def _future_gradients(model, T: int = 24):
  """For a few positions t: |d out_t / d x_s| summed over the sequence after t, and at t itself."""
  x_BTD = jax.random.normal(jax.random.key(fresh_seed()), (2, T, model.embed.shape[1]))
  grad_at = nnx.jit(nnx.grad(lambda m, x, t: jnp.sum(m.from_embeddings(x)[0][:, t, :259] ** 2), argnums=1))
  for t in (0, T // 3, T - 2):
    g_BTD = np.abs(np.asarray(grad_at(model, x_BTD, t)))
    yield t, float(g_BTD[:, t + 1:].sum()), float(g_BTD[:, t].sum(-1).min())


def _check_causality(c) -> None:
  model = _model(c)
  if is_causal(c.model):
    for t, future, itself in _future_gradients(model):
      assert future == 0.0, f'position {t} sees the future'
      assert itself > 0, f'position {t} does not see itself'
    return
  # Flagged as not causal: the probe the evaluation reports must see the look-ahead, which a discrete
  # choice hides from gradients.
  graphdef, *variables = nnx.split(model, nnx.Param, ...)
  leaks = evaluate.model_leaks(graphdef, variables, 32, seed=fresh_seed())
  assert leaks['perturbation'] > 1e-4, leaks


def _check_decoding(name: str, c) -> None:
  model = _model(c)
  if attention.REGISTRY[name].decodes:
    cache = assert_decoding_equals_parallel(model, T=14, P=5)
    assert int(cache['end']) == 14
  else:
    with pytest.raises(ValueError, match='cannot decode'):
      model.init_cache(2, 16)


def _check_pallas_equals_xla(make_config) -> None:
  seed = fresh_seed()
  models = [_model(make_config(kernel=kernel), seed) for kernel in ('xla', 'pallas')]
  tokens_BT = jax.random.randint(jax.random.key(seed), (2, 20), 0, 259)
  assert_same_loss_and_grads(*models, tokens_BT, loss_rtol=1e-5, atol=1e-5, rtol=1e-4)


def _check_flop_hooks(name: str, c) -> None:
  variant = attention.REGISTRY[name]
  names = {path[-1] for path in flops.param_sizes(c.model) if path[0] == 'blocks' and path[2] == 'attn'}
  unknown = set(variant.param_uses_per_token(c.model)) - names
  assert not unknown, f'{name}.param_uses_per_token names no parameter of the layer: {unknown}'
  T = c.data.seq_len
  keys = variant.attended_keys(c.model, T)
  # At least the query itself; at most every earlier key once per branch (3, NSA's) for every head the
  # layer runs, counted in units of its model.num_heads query heads.
  assert 1 <= keys <= 3 * (T + 1) / 2 * (1 + 16 / c.model.num_heads), keys
  counted = flops.flops_per_token(c)['flops_per_token']['attention']
  assert counted == 12 * c.model.num_layers * c.model.num_heads * c.model.head_dim * keys


def _bad_values(defaults: dict, prefix: str = 'model'):
  """(key path, a value no variant allows): -1 for every number among the variant's own defaults."""
  for key, value in defaults.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from _bad_values(dict(value), f'{prefix}.{key}')
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield f'{prefix}.{key}', -1


def _check_config_errors(c, defaults: dict) -> None:
  checks.check_model(c.model)  # the tiny settings run
  for key, bad in _bad_values(defaults):
    broken = c.copy_and_resolve_references()
    section, leaf = key.removeprefix('model.').rpartition('.')[::2]
    (broken.model[section] if section else broken.model)[leaf] = bad
    try:
      checks.check_model(broken.model)
    except ConfigError as error:
      message = str(error)
      assert f'{key}=' in message and '\n' not in message, message
    else:
      pytest.fail(f'{key}={bad} was accepted')


# ----------------------------------------------------------------------------- every registered variant

@pytest.mark.parametrize('name', ATTENTION)
def test_attention_is_causal_or_flagged_and_measured(name):
  _check_causality(variant_config(name))


_DECODE_CASES = [(name, kernel) for name in ATTENTION
                 for kernel in (('xla', 'pallas') if attention.REGISTRY[name].decodes else ('xla',))]


@pytest.mark.parametrize('name, kernel', _DECODE_CASES)
def test_attention_decodes_from_its_cache_as_in_the_parallel_pass(name, kernel):
  """With `pallas`, the prompt is prefilled through the kernels (interpreted here), as on an accelerator;
  a variant that does not decode is checked to refuse a cache."""
  _check_decoding(name, variant_config(name, kernel=kernel))


@pytest.mark.parametrize('name', [n for n in ATTENTION if attention.REGISTRY[n].decodes])
def test_a_prompt_into_an_empty_cache_runs_the_kernels(name):
  """Prefill is the training path: with `model.kernel=pallas` a prompt's program calls the Pallas kernels
  (the branch taken when the cache is empty), as a train step's does."""
  model = _model(variant_config(name, kernel='pallas'))
  graphdef, state = nnx.split(model)
  call = sample.model_call(graphdef, (state,))  # as the sampler calls the model

  def program(T: int) -> str:
    prompt_BT = jnp.zeros((2, T), jnp.int32)
    return str(jax.make_jaxpr(lambda tokens: call(tokens, model.init_cache(2, 12)))(prompt_BT))
  assert 'pallas_call' in program(9)
  assert 'pallas_call' not in program(1)  # one token reads the cache directly


@pytest.mark.parametrize('name', ATTENTION)
def test_attention_pallas_path_equals_xla_path(name):
  _check_pallas_equals_xla(lambda **kw: variant_config(name, **kw))


@pytest.mark.parametrize('name', ATTENTION)
def test_attention_flop_hooks_count_real_parameters(name):
  _check_flop_hooks(name, variant_config(name))


@pytest.mark.parametrize('name', ATTENTION)
def test_attention_config_errors_are_one_line_naming_the_key(name):
  _check_config_errors(variant_config(name), attention.REGISTRY[name].defaults())


# Documents of a packed row: shorter than a block, starting mid-block, a single token, one of several
# blocks; then padding. A variant that needs documents on its block grid (`document_alignment`) gets them
# as the packer lays them out: each document followed by padding of its own segment up to the grid.
_DOCUMENTS = (3, 9, 1, 7, 20)
_PADDING = 4


def _packed_row(align: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
  """Segment ids, positions, the real tokens (1) and each document's start."""
  seg, pos, real, starts = [], [], [], []
  for i, n in enumerate(_DOCUMENTS):
    size = -(-n // align) * align
    starts.append(len(seg))
    seg += [i + 1] * size
    pos += list(range(size))
    real += [1] * n + [0] * (size - n)
  seg, pos, real = seg + [0] * _PADDING, pos + list(range(_PADDING)), real + [0] * _PADDING
  return np.array(seg), np.array(pos), np.array(real), starts


def _check_documents_as_alone(name: str, kernel: str, adjust=None) -> None:
  """Each document of a packed row gets the logits it gets alone, and the gradient of a loss summed
  over the row's documents is the sum of each document's gradient alone. `adjust(model_config)`: settings
  beyond the variant's tiny ones."""
  c = variant_config(name, kernel=kernel)
  c.model.num_layers = 1  # a leak shows in the first layer; one layer halves the interpreted kernels' compile
  if name == 'nsa':  # more than the three forced blocks, so that scores choose too
    c.model.nsa.num_selected = 4
  if adjust is not None:
    adjust(c.model)
  model = _model(c)
  seg, pos, real, starts = _packed_row(attention.document_alignment(c.model))
  T = len(seg)
  seed = fresh_seed()
  tokens_BT = jax.random.randint(jax.random.key(seed), (1, T), 0, 259)
  seg_BT, pos_BT = jnp.asarray(seg[None], jnp.int32), jnp.asarray(pos[None], jnp.int32)
  weights_TV = jax.random.normal(jax.random.key(seed + 1), (T, 259)) * real[:, None]

  def packed(m):  # the loss, and the logits of the row
    logits_TV = m(tokens_BT, segment_ids=seg_BT, positions=pos_BT)[0][0, :, :259]
    return jnp.sum(logits_TV * weights_TV), logits_TV

  causal, longest = is_causal(c.model), max(_DOCUMENTS)

  def alone(m):  # the same summed over the documents run alone, and their logits
    if causal:  # each document a row of its own, padded after its end (which no earlier position sees)
      rows_NL = jnp.stack([jnp.pad(tokens_BT[0, a:a + n], (0, longest - n))
                           for a, n in zip(starts, _DOCUMENTS, strict=True)])
      logits_NLV = m(rows_NL)[0][:, :, :259]
      logits = [logits_NLV[i, :n] for i, n in enumerate(_DOCUMENTS)]
    else:  # a later token can change an earlier one's output: one call a document
      logits = [m(tokens_BT[:, a:a + n])[0][0, :, :259] for a, n in zip(starts, _DOCUMENTS, strict=True)]
    return sum(jnp.sum(x * weights_TV[a:a + len(x)]) for a, x in zip(starts, logits, strict=True)), logits

  # One compile a side (interpreted kernels compile slowly): the value, its gradient and the logits.
  (loss_p, logits_TV), grads_p = nnx.jit(nnx.value_and_grad(packed, has_aux=True))(model)
  (loss_a, alone_logits), grads_a = nnx.jit(nnx.value_and_grad(alone, has_aux=True))(model)
  for a, n, want in zip(starts, _DOCUMENTS, alone_logits, strict=True):
    np.testing.assert_allclose(np.asarray(logits_TV)[a:a + n], want, atol=2e-5, rtol=2e-5,
                               err_msg=f'document at {a} of {n} tokens')
  # A float32 sum of T x V terms of either sign: its error scales with the sum of their sizes.
  scale = float(jnp.sum(jnp.abs(logits_TV * weights_TV)))
  np.testing.assert_allclose(loss_p, loss_a, rtol=0, atol=1e-6 * scale)
  for gp, ga in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_a), strict=True):
    # Float32 sums over the documents in another order: errors scale with the leaf's largest entry.
    np.testing.assert_allclose(gp, ga, atol=2e-5 * max(1.0, float(np.abs(ga).max())), rtol=2e-4)


@pytest.mark.parametrize('kernel', ['pallas', 'xla'])
@pytest.mark.parametrize('name', ATTENTION)
def test_attention_keeps_packed_documents_apart(name, kernel):
  """The segments contract, which every registered variant meets: each document of a packed row gets
  what it gets alone, and the evaluation's document probe sees no leak (a variant that does not honour
  segment ids is refused instead: `test_a_variant_that_mixes_documents_is_refused`)."""
  assert attention.REGISTRY[name].segments
  _check_documents_as_alone(name, kernel)
  if kernel == 'xla':  # the evaluation's probe agrees
    c = variant_config(name)
    assert evaluate.keeps_documents_apart(c.model)
    graphdef, *variables = nnx.split(_model(c), nnx.Param, ...)
    # 0 up to float rounding: where a document's slots or chunks move with the other document (MoSA,
    # routing), sums of the same terms group differently (seen: 1.8e-7); a crossing variant is > 1e-3.
    assert evaluate.document_leak(graphdef, variables, 24, seed=fresh_seed()) < 1e-5


def test_document_probe_sees_attention_that_crosses_documents(monkeypatch):
  """A variant that says it honours segments but attends across documents is caught by the probe."""
  class Crossing(attention.dense.Attention):
    def attend(self, q_BTHD, k_BTKD, v_BTKD, seg_BT=None):
      return super().attend(q_BTHD, k_BTKD, v_BTKD, None)

  monkeypatch.setitem(attention.REGISTRY, 'crossing', Crossing)
  graphdef, *variables = nnx.split(_model(tiny_config(attention='crossing')), nnx.Param, ...)
  assert evaluate.document_leak(graphdef, variables, 24, seed=fresh_seed()) > 1e-3


@pytest.mark.parametrize('name', MLP)
def test_mlp_is_causal_where_it_says_so(name):
  c = variant_config(name, 'mlp')
  assert is_causal(c.model) == mlp.REGISTRY[name].is_causal(c.model)
  _check_causality(c)


@pytest.mark.parametrize('name', MLP)
def test_mlp_flop_hooks_count_real_parameters(name):
  c = variant_config(name, 'mlp')
  names = {path[-1] for path in flops.param_sizes(c.model) if path[0] == 'blocks' and path[2] == 'mlp'}
  for computed in (True, False):
    assert set(mlp.REGISTRY[name].param_uses_per_token(c.model, computed=computed)) <= names


@pytest.mark.parametrize('name', MLP)
def test_mlp_config_errors_are_one_line_naming_the_key(name):
  _check_config_errors(variant_config(name, 'mlp'), mlp.REGISTRY[name].defaults())


def test_every_variant_setting_has_its_default_in_the_base_config():
  c = config.base_config()
  for variant in (*attention.REGISTRY.values(), *mlp.REGISTRY.values()):
    for key, value in variant.defaults().items():
      assert c.model[key] == value, key


# ----------------------------------------------------------------------------- a throwaway variant

class CumulativeMean(base.Attention):
  """Each position takes the mean of the value projections at and before it: one file and one registry
  line, checked by the same contract as the real variants."""

  @staticmethod
  def defaults() -> dict:
    return {'cumulative_mean': ml_collections.ConfigDict({'gain': 1.0})}

  @classmethod
  def check_config(cls, cfg) -> None:
    if not cfg.cumulative_mean.gain > 0:
      raise ConfigError(f'model.cumulative_mean.gain={cfg.cumulative_mean.gain!r} must be > 0')

  @classmethod
  def attended_keys(cls, cfg, seq_len: int) -> float:
    return (seq_len + 1) / 2

  def __init__(self, cfg, *, rngs):
    self.wv = param(rngs, (cfg.d_model, cfg.d_model), ('embed', None), stddev=cfg.d_model**-0.5)
    self.gain = cfg.cumulative_mean.gain

  def __call__(self, x_BTD, pos_BT, seg_BT=None, cache=None, *, update_state=False):
    self.refuse_segments(seg_BT)
    v_BTD = x_BTD @ self.wv[...]
    return self.gain * jnp.cumsum(v_BTD, axis=1) / (1 + pos_BT)[..., None], cache


@pytest.fixture
def registered(monkeypatch):
  monkeypatch.setitem(attention.REGISTRY, 'cumulative_mean', CumulativeMean)  # the one registry line
  return 'cumulative_mean'


def test_a_variant_that_mixes_documents_is_refused(registered):
  """A variant that does not honour segment ids (the throwaway's running mean crosses documents) refuses
  them in one line, and the config check refuses document packing for it, naming the way out."""
  c = variant_config(registered)
  assert not evaluate.keeps_documents_apart(c.model)
  tokens_BT = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match='does not keep documents apart yet'):
    _model(c)(tokens_BT, segment_ids=jnp.ones((1, 8), jnp.int32), positions=jnp.zeros((1, 8), jnp.int32))
  c.data.source = f'text:{CORPUS_FILE}'
  with pytest.raises(ConfigError, match="data.packing='segments' needs attention that keeps documents apart"
                                        ".*use data.packing=concat"):
    checks.check_config(c, num_devices=1)


def test_a_new_variant_is_one_class_and_one_registry_line(registered):
  c = variant_config(registered)
  c.data.packing = 'concat'  # its running mean crosses documents: it trains on concatenated rows
  assert c.model.cumulative_mean.gain == 1.0  # its default reached the base config
  _check_config_errors(c, CumulativeMean.defaults())
  _check_flop_hooks(registered, c)
  _check_causality(c)
  _check_decoding(registered, c)
  _check_pallas_equals_xla(lambda **kw: variant_config(registered, **kw))
  # And it trains: one step moves the loss.
  tx, schedule = trainer.optim.make_optimizer(c.train)
  graphdef, params, model_state = nnx.split(_model(c), nnx.Param, ...)
  state = {'params': nnx.to_pure_dict(params), 'model_state': nnx.to_pure_dict(model_state), 'step': 0}
  state['opt_state'] = tx.init(state['params'])
  step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, 1))
  tokens_BT = jax.random.randint(jax.random.key(0), (4, 33), 0, 259)
  batch = {'inputs': tokens_BT[:, :-1], 'targets': tokens_BT[:, 1:]}
  state, first = step(state, batch)
  for _ in range(5):
    state, last = step(state, batch)
  assert float(last['loss']) < float(first['loss'])
