"""Evaluates a run's newest checkpoint on one task; prints one JSON object and appends it to
`WORKDIR/eval.jsonl`.

    python -m sparse_lm.evaluate --workdir=runs/default --task=perplexity [--seq_len=256,512,1024]
    python -m sparse_lm.evaluate --workdir=DIR --task=causality
    python -m sparse_lm.evaluate --workdir=DIR --task=passkey [--lengths=256,512] [--depths=0,0.5,1]
    python -m sparse_lm.evaluate --workdir=DIR --task=niah [--filler_source=text:PATH]
    python -m sparse_lm.evaluate --workdir=DIR --task=mqar [--mqar_shapes=64x4,128x8] [--mqar_vocab=256]
    python -m sparse_lm.evaluate --workdir=DIR --task=ruler [--lengths=1024,4096] [--tasks=niah_single_1,vt]
    python -m sparse_lm.evaluate --workdir=DIR --task=position_loss [--lengths=4096] [--source=...] \
        [--overlay=DIR2,DIR3]

`ruler` (`sparse_lm/ruler.py`) writes one JSON line per RULER task and length (decoded and parallel
scores, time), then a summary line with the average per length and a task x length heat map;
`position_loss` the mean loss in log-spaced position buckets of long documents and a plot overlaying the
`--overlay` runs' curves.

Every line carries `causality_leak`, the causality probe of the model (0 exactly for a causal model),
because a model that looks ahead scores better than it should on every task here. It is the larger of
two probes: the gradient leak (`gradient_leak` of the `causality` task, also written as `leak`, the name
INTERFACES.md gives it) and the perturbation leak, which replaces the inputs after `t` and measures how
far the outputs up to `t` move: a look-ahead through a discrete choice (a top-k over the whole sequence,
as in the papers' MoSA and routing attention) has zero gradient and shows only in the second. `passkey`
and `niah` also write a heat map (context length x needle depth) beside `eval.jsonl`.

MQAR vocabulary: Zoology uses 8192 symbols; a model here can only be asked about ids it embeds as
ordinary tokens, so the symbols are the ids [0, vocab) with vocab = min(8192, 256) for byte-level
models (the byte ids; BOS/EOS/PAD excluded) and min(8192, vocab_size) otherwise; a run trained on
`data.source=mqar` is asked in its own alphabet, Zoology's 8192 with `data.tokenizer=ids:8192`. Every
line says which vocabulary it used and whether that is Zoology's.
"""

import copy
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import flags, logging
from flax import nnx

from sparse_lm import attention, cli, data, ruler, sample, sharding, synthetic, trainer
from sparse_lm.errors import ConfigError
from sparse_lm.model import is_causal


@dataclasses.dataclass(frozen=True)
class Options:
  """What the tasks take; every field has a command-line flag of the same name."""

  seq_len: tuple[int, ...] = ()  # perplexity; () is the training length, twice it and four times it
  batch_size: int = 0  # perplexity; 0 is the run's train.batch_size
  eval_batches: int = 0  # perplexity; 0 is the run's train.eval_batches
  lengths: tuple[int, ...] = ()  # passkey, niah; () is the training length, twice it and four times it
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  num_samples: int = 8  # passkey, niah: keys per (length, depth) cell
  digits: int = 5
  filler_source: str = ''  # niah; '' is the run's own validation split, else any data.source
  mqar_shapes: tuple[tuple[int, int], ...] = tuple(synthetic.ZOOLOGY_KV_PAIRS.items())
  mqar_vocab: int = 0  # 0: see the module docstring
  mqar_examples: int = 64
  causality_batch: int = 2
  causality_positions: int = 4
  seed: int = 0
  use_cache: bool = True
  tasks: tuple[str, ...] = ()  # ruler: () is every task of sparse_lm.ruler.TASKS
  source: str = ''  # ruler's text haystacks, position_loss's documents; '' is the run's validation split
  documents: int = 16  # position_loss: documents averaged
  overlay: tuple[str, ...] = ()  # position_loss: other runs' workdirs whose curves the plot shows too


Run = trainer.Run


def _default_lengths(run: Run, lengths) -> tuple[int, ...]:
  seq_len = run.config.data.seq_len
  return tuple(lengths) or (seq_len, 2 * seq_len, 4 * seq_len)


def _progress(what: str, iterable=None, total: int | None = None) -> tqdm.tqdm:
  """A bar on stderr over a task's slow loop (compiling and running the model at each length)."""
  return tqdm.tqdm(iterable, total=total, desc=what, file=sys.stderr, leave=False, dynamic_ncols=True)


def _model(run: Run):
  return nnx.merge(run.graphdef, *run.variables)


# ----------------------------------------------------------------------------- causality

def causality_leak(apply_fn, x_BTD: jax.Array, positions) -> float:
  """How much the output at `t` depends on inputs after `t`, relative to inputs at or before it.

  For each `t` in `positions`: the gradient `g` of a fixed random projection of `apply_fn(x)[:, t]`
  with respect to `x`; the leak is `|g[:, t+1:]| / |g[:, :t+1]|`, the largest over `positions`. A
  causal function gives exactly 0: no path carries a future input to the output, so its gradient is
  a structural zero, not a small number.
  """
  out_shape = jax.eval_shape(apply_fn, x_BTD).shape
  u = jax.random.normal(jax.random.key(0), (1, *out_shape[2:]))
  T = x_BTD.shape[1]

  def leak_at(t):
    g_BTD = jax.grad(lambda x: jnp.sum(apply_fn(x)[:, t] * u))(x_BTD)
    sq_T = jnp.sum(jnp.square(g_BTD.reshape(*g_BTD.shape[:2], -1)), axis=(0, 2))
    future_T = jnp.arange(T) > t
    return jnp.sqrt(jnp.sum(jnp.where(future_T, sq_T, 0.0)) / jnp.sum(jnp.where(future_T, 0.0, sq_T)))
  # lax.map, not vmap: one compilation for every t without batching the model (ragged_dot, the MoE
  # layer's grouped matmul, has no batching rule for the position axis).
  return float(jnp.max(jax.jit(lambda ts: jax.lax.map(leak_at, ts))(jnp.asarray(positions, jnp.int32))))


def perturbation_leak(apply_fn, x_BTD: jax.Array, other_BTD: jax.Array, positions) -> float:
  """How far the outputs up to `t` move, relative to their size, when every input after `t` is replaced
  by `other_BTD`'s; the largest over `positions`. Exactly 0 for a causal function."""
  T = x_BTD.shape[1]

  @jax.jit
  def replaced_after(s):
    """The outputs with every input after `s` replaced (none for s = T - 1). One program serves the base
    and every probe, so a prefix whose inputs match gets bit-identical outputs from a causal function;
    two programs (eager against jitted, or fused differently) would differ in rounding."""
    return apply_fn(jnp.where((jnp.arange(T) > s)[None, :, None], other_BTD, x_BTD))

  base_TX = np.asarray(replaced_after(T - 1), np.float64)
  base_TX = base_TX.reshape(*base_TX.shape[:2], -1).transpose(1, 0, 2).reshape(T, -1)
  leaks = []
  for t in positions:
    moved_TX = np.asarray(replaced_after(t), np.float64).reshape(*x_BTD.shape[:2], -1)
    moved_TX = moved_TX.transpose(1, 0, 2).reshape(T, -1)
    leaks.append(np.linalg.norm(moved_TX[:t + 1] - base_TX[:t + 1]) / np.linalg.norm(base_TX[:t + 1]))
  return float(max(leaks))


def probe_positions(seq_len: int, count: int) -> list[int]:
  """`count` positions spread over the sequence, each with at least one input after it."""
  return sorted({int(t) for t in np.linspace(seq_len // 8, seq_len - 2, count)})


def model_leak(graphdef, variables, seq_len: int, *, batch: int = 2, positions: int = 4,
               vocab: int = 256, seed: int = 0) -> float:
  """`causality_leak` (the gradient probe) of a model through `from_embeddings`, on random tokens."""
  return model_leaks(graphdef, variables, seq_len, batch=batch, positions=positions, vocab=vocab,
                     seed=seed)['gradient']


def model_leaks(graphdef, variables, seq_len: int, *, batch: int = 2, positions: int = 4,
                vocab: int = 256, seed: int = 0) -> dict[str, float]:
  """Both probes of a model through `from_embeddings`, on random tokens (the perturbation replaces the
  future tokens with other random tokens)."""
  key_x, key_other = jax.random.split(jax.random.key(seed))
  model = nnx.merge(graphdef, *variables)
  x_BTD = model.embed_tokens(jax.random.randint(key_x, (batch, seq_len), 0, vocab))
  other_BTD = model.embed_tokens(jax.random.randint(key_other, (batch, seq_len), 0, vocab))

  def apply_fn(x_BTD):
    # The real vocabulary's logits: the padding's are a -1e30 constant, whose square would overflow the
    # perturbation probe's norm to inf and its ratio to 0.
    return nnx.merge(graphdef, *variables).from_embeddings(x_BTD)[0][..., :model.vocab_size]
  ts = probe_positions(seq_len, positions)
  with _progress('causality probes', total=2) as bar:
    gradient = causality_leak(apply_fn, x_BTD, ts)
    bar.update()
    perturbation = perturbation_leak(apply_fn, x_BTD, other_BTD, ts)
    bar.update()
  return {'gradient': gradient, 'perturbation': perturbation}


def keeps_documents_apart(model_cfg) -> bool:
  """Whether every layer's attention honours segment ids (so document packing can train it)."""
  variant = attention.REGISTRY[model_cfg.attention]
  return all(variant.at_layer(model_cfg, layer).segments for layer in range(model_cfg.num_layers))


def document_leak(graphdef, variables, seq_len: int, *, batch: int = 2, vocab: int = 256,
                  seed: int = 0) -> float:
  """How far the outputs of the second document of a packed row move, relative to their size, when the
  first document's tokens are replaced by others: 0 when the model keeps documents apart (up to float
  rounding where the second document's slots move with the first's, MoSA and routing: below 1e-5). The
  first document ends a third of the way in, off any block grid of a power of two, so block variants are
  probed where their blocks straddle the boundary too."""
  key_x, key_other = jax.random.split(jax.random.key(seed + 1))
  model = nnx.merge(graphdef, *variables)
  first = max(1, seq_len // 3 + 1)
  seg_BT = jnp.broadcast_to((jnp.arange(seq_len) >= first).astype(jnp.int32) + 1, (batch, seq_len))
  pos_BT = jnp.broadcast_to(jnp.where(jnp.arange(seq_len) >= first, jnp.arange(seq_len) - first,
                                      jnp.arange(seq_len)), (batch, seq_len))
  tokens_BT = jax.random.randint(key_x, (batch, seq_len), 0, vocab)
  other_BT = jnp.where(seg_BT == 1, jax.random.randint(key_other, (batch, seq_len), 0, vocab), tokens_BT)

  @jax.jit
  def second_document(tokens_BT):
    logits = nnx.merge(graphdef, *variables)(tokens_BT, segment_ids=seg_BT, positions=pos_BT)[0]
    return logits[:, first:, :model.vocab_size]

  base, moved = (np.asarray(second_document(t), np.float64) for t in (tokens_BT, other_BT))
  return float(np.linalg.norm(moved - base) / np.linalg.norm(base))


def _run_leaks(run: Run, opts: Options) -> dict[str, float]:
  return model_leaks(run.graphdef, run.variables, run.config.data.seq_len, batch=opts.causality_batch,
                     positions=opts.causality_positions, vocab=_symbol_vocab(run), seed=opts.seed)


def causality(run: Run, opts: Options, leaks: dict[str, float]) -> dict:
  """The probes of causality, and the document probe: `document_leak` (0 for a model that keeps packed
  documents apart; null for one whose attention refuses segment ids)."""
  documents = None
  if keeps_documents_apart(run.config.model):
    documents = document_leak(run.graphdef, run.variables, run.config.data.seq_len,
                              batch=opts.causality_batch, vocab=_symbol_vocab(run), seed=opts.seed)
  return {'gradient_leak': leaks['gradient'], 'leak': leaks['gradient'],
          'perturbation_leak': leaks['perturbation'], 'document_leak': documents,
          'causal': max(leaks.values()) == 0.0, 'seq_len': run.config.data.seq_len,
          'positions': probe_positions(run.config.data.seq_len, opts.causality_positions)}


# ----------------------------------------------------------------------------- perplexity

def perplexity(run: Run, opts: Options, leaks: dict[str, float]) -> dict:
  """Loss and bits per byte on the validation split at each length (longer than training: length
  extrapolation), with the trainer's own eval step; for a mixture, of each source as well."""
  del leaks
  eval_step = jax.jit(trainer.make_eval_step(run.graphdef, run.tok.token_bytes))
  mesh_config = copy.deepcopy(run.config.mesh)
  mesh_config.update({axis: 1 for axis in sharding.MESH_AXES} | {'data': -1})
  mesh = sharding.make_mesh(mesh_config)
  rows, lengths = [], _default_lengths(run, opts.seq_len)
  for seq_len in lengths:
    config = copy.deepcopy(run.config)
    config.data.seq_len = seq_len
    config.train.batch_size = opts.batch_size or config.train.batch_size
    config.train.eval_batches = opts.eval_batches or config.train.eval_batches
    sets = {name: _progress(f'perplexity at {seq_len} tokens{" of " + name if name else ""}', batches)
            for name, batches in data.eval_sets(config, run.tok).items()}
    rows.append({'seq_len': seq_len, **trainer.evaluate(eval_step, *run.variables, sets, mesh)})
  return {'results': rows, 'eval_loss': rows[0]['eval_loss'], 'eval_bpb': rows[0]['eval_bpb']}


# ----------------------------------------------------------------------------- passkey, needle

def _retrieval(run: Run, opts: Options, filler: list[int], needle: str, question: str, name: str
               ) -> dict:
  """Exact match of the greedy continuation after `question`, per (length, depth): a fraction of
  `num_samples` random keys. Each prompt is EOS (documents start after one in training) and then a
  haystack, `length` tokens in all."""
  tok, lengths, depths = run.tok, _default_lengths(run, opts.lengths), tuple(opts.depths)
  question_Q = [int(i) for i in tok.encode(question)]
  accuracy_LD = np.zeros((len(lengths), len(depths)))
  cells = {}  # (i, j): (keys, prompts), all built before any model runs, so a bad length fails at once
  for i, length in enumerate(lengths):
    for j, depth in enumerate(depths):
      rng = synthetic.rng_for(opts.seed, 'eval', i * len(depths) + j)
      keys = [synthetic.digits(rng, opts.digits) for _ in range(opts.num_samples)]
      try:
        cells[i, j] = keys, jnp.asarray([
            [tok.eos_id] + synthetic.haystack(filler, [int(t) for t in tok.encode(needle.format(key=key))],
                                              question_Q, length - 1, depth) for key in keys], jnp.int32)
      except ValueError as e:
        raise ConfigError(f'--lengths={",".join(map(str, lengths))}: {e}') from None
  for (i, j), (keys, prompts_NP) in _progress(f'{name} (length x depth)', cells.items()):
    num_new = max(len(tok.encode(key)) for key in keys)
    new_NA = sample.generate(run.graphdef, run.variables, prompts_NP, num_new, jax.random.key(0),
                             use_cache=opts.use_cache, causal=is_causal(run.config.model))
    accuracy_LD[i, j] = np.mean([tok.decode(new_A)[:len(key)] == key
                                 for new_A, key in zip(np.asarray(new_NA), keys, strict=True)])
  heatmap = run.workdir / f'{name}_step{run.step}.png'
  plot_heatmap(accuracy_LD, lengths, depths, heatmap, f'{name}: {run.config.model.attention}, '
               f'step {run.step}')
  # Chance: a key of `digits` uniform digits guessed exactly.
  return {'accuracy': float(accuracy_LD.mean()), 'chance': 10.0 ** -opts.digits,
          'lengths': list(lengths), 'depths': list(depths),
          'accuracy_by_length_depth': accuracy_LD.tolist(), 'heatmap': str(heatmap)}


def plot_heatmap(values_LD: np.ndarray, lengths, depths, path: pathlib.Path, title: str, *,
                 xlabel: str = 'needle depth', ylabel: str = 'context length (tokens)',
                 label: str = 'exact match') -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  # only the retrieval tasks plot
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(depths), 1.2 + 0.6 * len(lengths)))
  image = ax.imshow(values_LD, vmin=0.0, vmax=1.0, cmap='RdYlGn', aspect='auto')
  ax.set_xticks(range(len(depths)), [d if isinstance(d, str) else f'{d:g}' for d in depths],
                rotation=45 if any(isinstance(d, str) for d in depths) else 0, ha='right')
  ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  for (i, j), value in np.ndenumerate(values_LD):
    ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=8)
  fig.colorbar(image, ax=ax, label=label)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def passkey(run: Run, opts: Options, leaks: dict[str, float]) -> dict:
  del leaks
  filler = [int(t) for t in run.tok.encode(synthetic.PASSKEY_FILLER)]
  return _retrieval(run, opts, filler, synthetic.PASSKEY_NEEDLE, synthetic.PASSKEY_QUESTION, 'passkey')


def niah(run: Run, opts: Options, leaks: dict[str, float]) -> dict:
  """Needle in a haystack of real text: the run's validation split or `filler_source`."""
  del leaks
  config = copy.deepcopy(run.config)
  config.data.source = opts.filler_source or config.data.source
  needed = max(_default_lengths(run, opts.lengths))
  filler = []
  for document in data.corpus(config, 'validation').documents:
    filler += [int(t) for t in run.tok.encode(document)] + [run.tok.eos_id]
    if len(filler) >= needed:
      break
  return {'filler_source': config.data.source,
          **_retrieval(run, opts, filler, synthetic.NIAH_NEEDLE, synthetic.NIAH_QUESTION, 'niah')}


# ----------------------------------------------------------------------------- MQAR

def _symbol_vocab(run: Run) -> int:
  """The alphabet of a run trained on `data.source=mqar[:...]`; else the ids a model embeds as
  ordinary tokens: the 256 bytes of the byte tokenizer, or all of them."""
  name, _, arg = run.config.data.source.partition(':')
  if name == 'mqar':
    return data.mqar_args(arg, run.config)['vocab']
  vocab = 256 if run.config.data.tokenizer == 'byte' else run.config.model.vocab_size
  return min(synthetic.ZOOLOGY_VOCAB, vocab)


def mqar(run: Run, opts: Options, leaks: dict[str, float]) -> dict:
  """Accuracy of the greedy prediction at every query key (is it the key's value?), per Zoology shape."""
  del leaks
  vocab = opts.mqar_vocab or _symbol_vocab(run)
  model = _model(run)
  predict = jax.jit(lambda tokens_BT: jnp.argmax(model(tokens_BT)[0], axis=-1))
  rows = []
  for seq_len, num_kv_pairs in _progress('mqar shapes', opts.mqar_shapes):
    examples = [synthetic.mqar_example(synthetic.rng_for(opts.seed, 'eval', n), seq_len, num_kv_pairs,
                                       vocab) for n in range(opts.mqar_examples)]
    tokens_NT = np.stack([tokens_T for tokens_T, _ in examples])
    query_NK = np.stack([query_K for _, query_K in examples])
    predicted_NT = np.asarray(predict(jnp.asarray(tokens_NT)))
    correct_NK = (np.take_along_axis(predicted_NT, query_NK, axis=1)
                  == np.take_along_axis(tokens_NT, query_NK + 1, axis=1))
    # Chance: a value guessed among the value symbols, or (a model that has learnt the layout but not the
    # pairs) among this example's values.
    rows.append({'seq_len': seq_len, 'num_kv_pairs': num_kv_pairs, 'accuracy': float(correct_NK.mean()),
                 'chance': 1 / (vocab - vocab // 2), 'chance_in_context': 1 / num_kv_pairs})
  return {'accuracy': float(np.mean([row['accuracy'] for row in rows])), 'chance': 1 / (vocab - vocab // 2),
          'chance_in_context': float(np.mean([row['chance_in_context'] for row in rows])), 'results': rows,
          'vocab': vocab, 'zoology_vocab': synthetic.ZOOLOGY_VOCAB,
          'vocab_scaled': vocab != synthetic.ZOOLOGY_VOCAB}


# ----------------------------------------------------------------------------- RULER, loss by position

def _reach_check(run: Run, lengths, flag: str = 'lengths') -> None:
  """A length past what every layer together can attend to (sliding windows: layers x window) fails."""
  reach = attention.reach(run.config.model)
  if reach is not None and max(lengths) > reach:
    raise ConfigError(f'--{flag}={",".join(map(str, lengths))}: {max(lengths)} is beyond the {reach} tokens '
                      f'model.attention={run.config.model.attention!r} can reach (its layers\' windows); '
                      f'allowed: up to {reach}')


def _source_text(run: Run, source: str, tokens: int) -> list[str]:
  """Documents of `source` (default the run's validation split) until they hold `tokens` tokens."""
  config = copy.deepcopy(run.config)
  config.data.source = source or config.data.source
  documents, held = [], 0
  for document in data.corpus(config, 'validation').documents:
    documents.append(document)
    held += len(run.tok.encode(document))
    if held >= tokens:
      break
  return documents


# Module-level and keyed by the model's structure, so repeated calls (ruler's cells, each evaluation of
# train.eval_tasks) reuse their compilations.
@functools.partial(jax.jit, static_argnums=0)
def _greedy(graphdef, variables, tokens_BT):
  """Per position: the greedy next token and the loss (nats) of the row's actual next token."""
  logp_BTV = jax.nn.log_softmax(sample.model_call(graphdef, variables)(tokens_BT)[0].astype(jnp.float32))
  next_BT = jnp.concatenate([tokens_BT[:, 1:], tokens_BT[:, -1:]], axis=1)
  return jnp.argmax(logp_BTV, axis=-1), -jnp.take_along_axis(logp_BTV, next_BT[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=0)
def _nll(graphdef, variables, batch):
  return trainer.forward(graphdef, variables[0], batch, variables[1])[0]


def _greedy_hits(run: Run, rows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
  """For each row of tokens, per token after the first: whether it is the model's greedy choice given the
  ones before it, and its loss (nats) given them. One parallel pass over the rows, padded at the end (to a
  multiple of 64)."""
  width = -(-max(map(len, rows)) // 64) * 64
  tokens_BT = np.zeros((len(rows), width), np.int32)
  for b, row in enumerate(rows):
    tokens_BT[b, :len(row)] = row
  predicted_BT, nll_BT = map(np.asarray, _greedy(run.graphdef, run.variables, jnp.asarray(tokens_BT)))
  return [(predicted_BT[b, :len(row) - 1] == np.asarray(row[1:]), nll_BT[b, :len(row) - 1])
          for b, row in enumerate(rows)]


def _ruler_cells(run: Run, opts: Options) -> dict:
  """Every (task, length)'s examples, built before any model runs, so bad input fails at once."""
  tok, lengths, names = run.tok, _default_lengths(run, opts.lengths), tuple(opts.tasks) or ruler.TASKS
  for name in names:
    if name not in ruler.TASKS:
      raise ConfigError(f'--tasks={",".join(names)}: {name!r} is not a RULER task; the tasks: '
                        f'{", ".join(ruler.TASKS)}')
  _reach_check(run, lengths)
  encode = lambda text: [int(i) for i in tok.encode(text)]  # noqa: E731
  probe = ' What is the special magic number for kuzu? VAR ABCDE = 12345. 80cb-d21d, 1. word:'
  try:
    writes = tok.decode(encode(probe)) == probe
  except ValueError:
    writes = False
  if not writes:
    raise ConfigError(f'data.tokenizer={run.config.data.tokenizer!r} cannot write the suite\'s prompts (its '
                      'text does not survive encoding and decoding); the suite needs a text tokenizer')
  builder = ruler.Builder(encode, tok.eos_id, '\n'.join(_source_text(run, opts.source, max(lengths))))
  cells = {}
  for name in names:
    for length in lengths:
      try:
        cells[name, length] = [builder.example(name, length, ruler.rng_for(opts.seed, name, length, n))
                               for n in range(opts.num_samples)]
      except ValueError as e:
        raise ConfigError(f'--lengths={",".join(map(str, lengths))} --tasks={name}: {e}') from None
  for name, length in cells:
    for example in cells[name, length]:
      for answer in example.answers:
        if tok.decode(encode(answer)) != answer:
          raise ConfigError(f'data.tokenizer={run.config.data.tokenizer!r} cannot write the suite\'s '
                            f'prompts: {answer!r} does not survive encoding and decoding')
  return cells


def ruler_suite(run: Run, opts: Options, leaks: dict[str, float]) -> dict:
  """RULER-style tasks (sparse_lm/ruler.py) at each length: decoded recall and, for a causal model, the
  recall of one parallel pass (each answer counts when all its tokens are greedy given the gold ones
  before it) and, from the same pass, `answer_loss`: the mean loss (nats) of the gold answers' tokens, a
  graded score that still separates models too small to recall anything."""
  del leaks
  tok, lengths, names = run.tok, _default_lengths(run, opts.lengths), tuple(opts.tasks) or ruler.TASKS
  cells = _ruler_cells(run, opts)
  encode = lambda text: [int(i) for i in tok.encode(text)]  # noqa: E731
  causal = is_causal(run.config.model)
  lines = []
  for (name, length), examples in _progress('ruler (task x length)', cells.items()):
    start = time.perf_counter()
    prompts_NP = jnp.asarray([e.prompt for e in examples], jnp.int32)
    new_NA = np.asarray(sample.generate(run.graphdef, run.variables, prompts_NP,
                                        max(e.max_new for e in examples), jax.random.key(0),
                                        use_cache=opts.use_cache, causal=causal))
    outputs = []
    for ids in new_NA.tolist():
      outputs.append(tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids))
    decoded = float(np.mean([ruler.recall(o, e.answers) for o, e in zip(outputs, examples, strict=True)]))
    decode_seconds = time.perf_counter() - start
    parallel = answer_loss = None
    if causal:
      rows, spans = [], []
      for e in examples:
        joined = ', ' if name != 'vt' else ' '
        ends = [len(encode(' ' + joined.join(e.answers[:i + 1]))) for i in range(len(e.answers))]
        rows.append(e.prompt + encode(' ' + joined.join(e.answers)))
        spans.append([(len(e.prompt) - 1 + (ends[i - 1] if i else 0), len(e.prompt) - 1 + end)
                      for i, end in enumerate(ends)])
      scored = _greedy_hits(run, rows)
      parallel = float(np.mean([np.mean([hit[a:b].all() for a, b in span])
                                for (hit, _), span in zip(scored, spans, strict=True)]))
      answer_loss = float(np.mean([np.concatenate([nll[a:b] for a, b in span]).mean()
                                   for (_, nll), span in zip(scored, spans, strict=True)]))
    lines.append({'ruler_task': name, 'length': length, 'score': decoded, 'score_parallel': parallel,
                  'answer_loss': answer_loss,
                  'num_samples': len(examples), 'seconds_decode': round(decode_seconds, 3),
                  'seconds_parallel': round(time.perf_counter() - start - decode_seconds, 3),
                  'example_output': outputs[0][:200], 'example_answers': list(examples[0].answers)})
  scores_TL = np.asarray([[next(r['score'] for r in lines if r['ruler_task'] == n and r['length'] == length)
                           for n in names] for length in lengths])
  heatmap = run.workdir / f'ruler_step{run.step}.png'
  plot_heatmap(scores_TL, lengths, list(names), heatmap, f'RULER-style: {run.config.model.attention}, step '
               f'{run.step} (decoded recall)', xlabel='task', label='recall')
  return {'score': float(scores_TL.mean()), 'lengths': list(lengths), 'tasks': list(names),
          'average_by_length': {str(n): float(np.mean([r['score'] for r in lines if r['length'] == n]))
                                for n in lengths},
          'average_by_length_parallel': None if not causal else {
              str(n): float(np.mean([r['score_parallel'] for r in lines if r['length'] == n]))
              for n in lengths},
          'answer_loss_by_length': None if not causal else {
              str(n): float(np.mean([r['answer_loss'] for r in lines if r['length'] == n]))
              for n in lengths},
          'heatmap': str(heatmap), 'lines': lines,
          'note': 'a CPU-sized model (below about the 100m rung) scores near 0 on most of these tasks; '
                  'the scores compare variants only where one is clearly above 0 (answer_loss, lower is '
                  'better, compares them where none is)'}


def position_buckets(length: int, count: int = 16) -> list[tuple[int, int]]:
  """Log-spaced `[start, end)` position ranges covering 0..length-1 (the first ones single positions)."""
  edges = sorted({0, *(int(round(x)) for x in np.logspace(0, math.log10(length), count + 1)), length})
  return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def position_loss(run: Run, opts: Options, leaks: dict[str, float]) -> dict:
  """Mean loss at each position bucket over `documents` long documents of the source, each read from its
  start (after an end-of-document token) to the longest of `lengths`; one pass a document."""
  del leaks
  # No reach check: a windowed model's loss past its reach is what this curve is for.
  length = max(opts.lengths or (run.config.data.seq_len,))
  config = copy.deepcopy(run.config)
  config.data.source = opts.source or config.data.source
  rows = []
  for document in data.corpus(config, 'validation').documents:
    ids = [int(i) for i in run.tok.encode(document)]
    if len(ids) >= length:
      rows.append([run.tok.eos_id, *ids[:length]])
      if len(rows) == opts.documents:
        break
  if not rows:
    raise ConfigError(f'--lengths={length}: no document of data.source={config.data.source!r} (validation) '
                      f'has {length} tokens; pass a shorter length or a --source of longer documents')
  nll = []
  for row in _progress(f'position loss at {length} tokens', rows):
    batch = {'inputs': jnp.asarray([row[:-1]], jnp.int32), 'targets': jnp.asarray([row[1:]], jnp.int32)}
    nll.append(np.asarray(_nll(run.graphdef, run.variables, batch))[0])
  nll_NT = np.stack(nll)
  buckets = [{'start': a, 'end': b, 'loss': float(nll_NT[:, a:b].mean())}
             for a, b in position_buckets(length)]
  result = {'length': length, 'documents': len(rows), 'source': config.data.source, 'buckets': buckets,
            'mean_loss': float(nll_NT.mean()), 'attention': run.config.model.attention}
  curves = {f'{run.config.model.attention} ({run.workdir.name})': buckets}
  for other in opts.overlay:
    path = pathlib.Path(other) / 'eval.jsonl'
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    theirs = [x for x in lines if x.get('task') == 'position_loss']
    if not theirs:
      raise ConfigError(f'--overlay={other}: no position_loss line in {path}; evaluate that run first')
    curves[f'{theirs[-1]["attention"]} ({pathlib.Path(other).name})'] = theirs[-1]['buckets']
  plot = run.workdir / f'position_loss_step{run.step}.png'
  _plot_curves(curves, plot, f'loss by position, {length} tokens, {len(rows)} documents')
  return {**result, 'plot': str(plot)}


def _plot_curves(curves: dict, path: pathlib.Path, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for label, buckets in curves.items():
    ax.plot([math.sqrt(max(b['start'], 1) * b['end']) for b in buckets], [b['loss'] for b in buckets],
            marker='o', markersize=3, label=label)
  ax.set_xscale('log')
  ax.set_xlabel('position in the document (tokens, log scale)')
  ax.set_ylabel('mean loss (nats)')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------- in training

RULER_IN_TRAINING = ('niah_single_1', 'niah_single_2')  # the tasks that fit short training lengths


def in_training(config, tok, graphdef, workdir):
  """The function the train loop calls at every `train.eval_every` for `train.eval_tasks`: `(params,
  model_state, step) -> metrics` (flat numbers: metrics.jsonl and TensorBoard). Each task runs at
  `data.seq_len` on `train.eval_task_samples` examples, on the variables gathered to this process; a
  task that cannot run at that length fails here, before the first step."""
  names = tuple(n.strip() for n in config.train.eval_tasks.split(',') if n.strip())
  n, seq_len = config.train.eval_task_samples, config.data.seq_len
  opts = Options(lengths=(seq_len,), depths=(0.0, 0.5, 1.0), num_samples=n, documents=n, mqar_examples=n,
                 mqar_shapes=((seq_len, synthetic.default_kv_pairs(seq_len)),), tasks=RULER_IN_TRAINING)
  workdir = pathlib.Path(workdir)
  where = f'train.eval_tasks={config.train.eval_tasks!r} at data.seq_len={seq_len}'
  if 'ruler' in names:  # the prompts are built once here, so a length too short fails before training
    try:
      _ruler_cells(Run(workdir, config, tok, graphdef, None, 0), opts)
    except ConfigError as e:
      raise ConfigError(f'{where}: {e}') from None
  for name, needle, question in (('passkey', synthetic.PASSKEY_NEEDLE, synthetic.PASSKEY_QUESTION),
                                 ('niah', synthetic.NIAH_NEEDLE, synthetic.NIAH_QUESTION)):
    need = 1 + len(tok.encode(needle.format(key='0' * opts.digits))) + len(tok.encode(question))
    if name in names and need > seq_len:
      raise ConfigError(f'{where}: a {name} prompt needs more than {need} tokens')

  def run_tasks(params, model_state, step: int) -> dict[str, float]:
    run = Run(workdir, config, tok, graphdef, jax.device_get((params, model_state)), step)
    metrics = {}
    for name in names:
      metrics.update(_metrics(name, TASKS[name](run, opts, {})))
    return metrics
  return run_tasks


def _metrics(name: str, result: dict) -> dict[str, float]:
  """A task's result as flat numbers."""
  if name == 'position_loss':
    return {'position_loss': result['mean_loss'],
            **{f'position_loss/{b["start"]}_{b["end"]}': b['loss'] for b in result['buckets']}}
  if name == 'ruler':
    out = {'ruler_score': result['score']}
    for line in result['lines']:
      out[f'ruler/{line["ruler_task"]}'] = line['score']
      if line['score_parallel'] is not None:
        out[f'ruler_parallel/{line["ruler_task"]}'] = line['score_parallel']
        out[f'ruler_answer_loss/{line["ruler_task"]}'] = line['answer_loss']
    return out
  return {f'{name}_accuracy': result['accuracy']}


# ----------------------------------------------------------------------------- the command

TASKS = {
    'perplexity': perplexity,
    'causality': causality,
    'passkey': passkey,
    'niah': niah,
    'mqar': mqar,
    'ruler': ruler_suite,
    'position_loss': position_loss,
}
# The `Options` each task reads, recorded as its result's `params`; the causality probe's settings go
# into every result, since every result carries `causality_leak`.
_PROBE_OPTIONS = ('causality_batch', 'causality_positions', 'seed')
TASK_OPTIONS = {
    'perplexity': ('seq_len', 'batch_size', 'eval_batches'),
    'causality': (),
    'passkey': ('lengths', 'depths', 'num_samples', 'digits', 'use_cache'),
    'niah': ('lengths', 'depths', 'num_samples', 'digits', 'use_cache', 'filler_source'),
    'mqar': ('mqar_shapes', 'mqar_vocab', 'mqar_examples'),
    'ruler': ('lengths', 'tasks', 'num_samples', 'use_cache', 'source'),
    'position_loss': ('lengths', 'documents', 'source', 'overlay'),
}


def run_task(workdir, task: str, opts: Options = Options()) -> dict:
  """Evaluates the newest checkpoint in `workdir` on `task`; appends the result to `eval.jsonl`."""
  if task not in TASKS:
    raise ValueError(f'--task={task!r} is not one of {", ".join(TASKS)}')
  run = trainer.load_run(workdir)
  leaks = _run_leaks(run, opts)
  num_params = sum(np.size(x) for x in jax.tree.leaves(run.variables[0]))
  settings = {name: getattr(opts, name) for name in (*TASK_OPTIONS[task], *_PROBE_OPTIONS)}
  result = {'task': task, 'workdir': str(run.workdir), 'step': run.step,
            'attention': run.config.model.attention, 'mlp': run.config.model.mlp,
            'num_params': int(num_params), 'causal_architecture': is_causal(run.config.model),
            'causality_leak': max(leaks.values()), **TASKS[task](run, opts, leaks), 'params': settings}
  # A task of many cells (ruler) writes a line per cell, with the run's fields, before its summary.
  lines = [{**{k: result[k] for k in ('task', 'workdir', 'step', 'attention', 'causality_leak')}, **line}
           for line in result.pop('lines', [])]
  with open(run.workdir / 'eval.jsonl', 'a', encoding='utf-8') as f:
    for line in [*lines, result]:
      f.write(json.dumps(line) + '\n')
  return {**result, 'lines': lines} if lines else result


_DEFAULTS = Options()


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    opts = Options(
        seq_len=_numbers('seq_len', _SEQ_LEN.value, int), batch_size=_BATCH_SIZE.value,
        eval_batches=_EVAL_BATCHES.value, lengths=_numbers('lengths', _LENGTHS.value, int),
        depths=_numbers('depths', _DEPTHS.value, float, high=1.0), num_samples=_NUM_SAMPLES.value,
        digits=_DIGITS.value, filler_source=_FILLER.value,
        mqar_shapes=tuple(_numbers('mqar_shapes', shape.split('x'), int) for shape in _MQAR_SHAPES.value),
        mqar_vocab=_MQAR_VOCAB.value, mqar_examples=_MQAR_EXAMPLES.value, seed=_SEED.value,
        use_cache=_USE_CACHE.value, tasks=tuple(_TASKS.value), source=_SOURCE.value,
        documents=_DOCUMENTS.value, overlay=tuple(_OVERLAY.value))
    for name in ('batch_size', 'eval_batches', 'mqar_vocab'):
      if getattr(opts, name) < 0:
        raise ConfigError(f'--{name}={getattr(opts, name)} must be at least 0 (0: the default)')
    for name in ('num_samples', 'digits', 'mqar_examples', 'documents'):
      if getattr(opts, name) < 1:
        raise ConfigError(f'--{name}={getattr(opts, name)} must be at least 1')
    result = run_task(_WORKDIR.value, _TASK.value, opts)
  except ConfigError as e:
    sys.exit(f'evaluate: {e}')
  for line in result.pop('lines', []):
    print(json.dumps(line))
  print(json.dumps(result))


def _numbers(name: str, texts, kind, high=None) -> tuple:
  """A list flag's values as positive ints (or floats in [0, high]); a ConfigError naming the flag."""
  try:
    values = tuple(kind(t) for t in texts)
  except ValueError:
    raise ConfigError(f'--{name}={",".join(texts)}: expected comma-separated {kind.__name__}s') from None
  if any(v < 0 or (high is None and v == 0) or (high is not None and v > high) for v in values):
    allowed = f'in [0, {high}]' if high is not None else 'positive'
    raise ConfigError(f'--{name}={",".join(texts)}: each value must be {allowed}')
  return values


if __name__ == '__main__':
  # Defined only for the command, so that modules importing this one (the train loop's
  # train.eval_tasks) can define flags of the same names.
  _WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'The run to evaluate (its newest checkpoint).')
  _TASK = flags.DEFINE_enum('task', 'perplexity', list(TASKS), 'What to evaluate.')
  _SEQ_LEN = flags.DEFINE_list('seq_len', [], 'perplexity: lengths; default the training length, 2x, 4x.')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 0, 'perplexity: sequences per batch; 0: the run\'s.')
  _EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 0, 'perplexity: batches; 0: the run\'s.')
  _LENGTHS = flags.DEFINE_list('lengths', [], 'passkey, niah: context lengths in tokens; default as '
                               '--seq_len.')
  _DEPTHS = flags.DEFINE_list('depths', [str(d) for d in _DEFAULTS.depths],
                              'passkey, niah: needle depths, 0 (start) to 1 (end).')
  _NUM_SAMPLES = flags.DEFINE_integer('num_samples', _DEFAULTS.num_samples, 'passkey, niah: keys per cell.')
  _DIGITS = flags.DEFINE_integer('digits', _DEFAULTS.digits, 'passkey, niah: digits per key.')
  _FILLER = flags.DEFINE_string('filler_source', '', 'niah: a data.source for the haystack; default the '
                                'run\'s own validation split.')
  _MQAR_SHAPES = flags.DEFINE_list('mqar_shapes', [f'{t}x{k}' for t, k in _DEFAULTS.mqar_shapes],
                                   'mqar: SEQ_LENxKV_PAIRS; default Zoology\'s four.')
  _MQAR_VOCAB = flags.DEFINE_integer('mqar_vocab', 0, 'mqar: symbols; 0: min(8192, the model\'s ordinary '
                                     'token ids).')
  _MQAR_EXAMPLES = flags.DEFINE_integer('mqar_examples', _DEFAULTS.mqar_examples, 'mqar: examples per shape.')
  _SEED = flags.DEFINE_integer('seed', 0, 'Seed of the generated examples and of the causality probe.')
  _USE_CACHE = flags.DEFINE_bool('use_cache', True, 'passkey, niah, ruler: decode with the KV cache.')
  _TASKS = flags.DEFINE_list('tasks', [], f'ruler: which tasks; default all ({", ".join(ruler.TASKS)}).')
  _SOURCE = flags.DEFINE_string('source', '', 'ruler (text haystacks), position_loss (documents): a '
                                'data.source; default the run\'s own validation split.')
  _DOCUMENTS = flags.DEFINE_integer('documents', _DEFAULTS.documents, 'position_loss: documents averaged.')
  _OVERLAY = flags.DEFINE_list('overlay', [], 'position_loss: workdirs of runs evaluated before, whose '
                               'curves the plot shows too.')
  cli.run(main, 'evaluate')
