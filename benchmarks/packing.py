"""Document packing on this CPU: a train step at T=4,096 on documents of the embedded corpus, with
`data.packing=segments` against `concat`, on the kernel path (Pallas, interpreted here) and the XLA path,
and the attention tiles the kernels compute for such rows.

    python benchmarks/packing.py [--steps=12] [--seq_len=4096] [--variants=dense,nsa] [--kernels=pallas,xla]

First, what aligning each document to a block grid would cost in padding, over the embedded corpus, and
the tiles each kernel that takes segment ids visits for a row of sixteen documents against one.
For each variant, path and packing: the median time of the steps after the first two (compilation),
the loss of the last step, and, for the kernel path, the forward tiles the flash-attention kernels visit
for the rows trained on (their own loop bounds, `computed_tiles`) against one document a row. A small
model (2 layers, width 256, 4 heads of 64), batch 2, byte tokens of the stdlib corpus (source files,
cut at 64 KiB): with documents this long, most rows hold one or two documents. One process on this
machine; nothing else should run beside it. Numbers go in BENCHMARKS.md.
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels.block_selection import computed_tiles as selection_tiles
from pallas_kernels.flash_attention import computed_tiles
from sparse_lm import data, optim, trainer
from sparse_lm.config import base_config
from sparse_lm.tokenizer import ByteTokenizer

_STEPS = flags.DEFINE_integer('steps', 12, 'Train steps per case (the first two are compilation).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 4096, 'Tokens per row.')
_VARIANTS = flags.DEFINE_list('variants', ['dense', 'nsa'], 'Attention variants that honour segments.')
_KERNELS = flags.DEFINE_list('kernels', ['pallas', 'xla'], 'Paths: pallas (interpreted here) and xla.')
_BLOCK = 64  # the GPU body's default tile, as the kernel path uses here


def _config(variant: str, kernel: str, packing: str):
  c = base_config()
  m = c.model
  m.attention, m.kernel = variant, kernel
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 256, 4, 2, 64, 512
  m.vocab_size = ByteTokenizer.vocab_size
  c.data.seq_len, c.data.packing = _SEQ_LEN.value, packing
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 2, _STEPS.value, 2
  return c


def _case(variant: str, kernel: str, packing: str) -> dict:
  c = _config(variant, kernel, packing)
  tok = ByteTokenizer()
  tx, schedule = optim.make_optimizer(c.train)
  graphdef, _, _ = trainer.split_model(c.model)
  init = trainer.state_init_fn(c, tx)
  state = jax.jit(init)(jax.random.key(0))
  step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, 1), donate_argnums=0)
  iterator = data.make_train_iterator(c, tok)
  times, tiles, whole = [], 0, 0
  for _ in range(c.train.steps):
    batch = next(iterator)
    if 'segment_ids' in batch:
      tiles += computed_tiles(c.data.seq_len, block_q=_BLOCK, block_k=_BLOCK,
                              segment_ids=jnp.asarray(batch['segment_ids']))
    whole += computed_tiles(c.data.seq_len, block_q=_BLOCK, block_k=_BLOCK) * len(batch['inputs'])
    start = time.perf_counter()
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    loss = float(metrics['loss'])  # waits for the step
    times.append(time.perf_counter() - start)
  lengths = iterator.take_document_lengths()
  return {'variant': variant, 'kernel': kernel, 'packing': packing, 'seq_len': c.data.seq_len,
          'step_seconds_median': round(statistics.median(times[2:]), 3), 'last_loss': round(loss, 4),
          'documents_per_row': (round(sum(lengths.values()) / (c.train.steps * c.train.batch_size), 2)
                                if lengths else 1.0),
          'kernel_tiles_fraction_of_one_document': round(tiles / whole, 4) if tiles else 1.0}


def _alignment_costs() -> dict:
  """The share of row tokens that padding each document (BOS, its bytes, EOS) to a multiple of a block
  would cost, over the embedded corpus's train documents: what aligning documents to a block-based
  variant's grid costs."""
  lengths = []
  for element in data.corpus(base_config(), 'train').documents:
    texts = element if isinstance(element, list) else [element]
    lengths += [len(text.encode('utf-8')) + 2 for text in texts]
  lengths = np.asarray(lengths)
  costs = {}
  for block in (16, 64, 128, 512, 4096):
    padded = -(-lengths // block) * block
    costs[block] = round(100 * float(padded.sum() - lengths.sum()) / float(padded.sum()), 2)
  return {'documents': len(lengths), 'tokens': int(lengths.sum()), 'median_length': float(np.median(lengths)),
          'alignment_padding_percent_by_block': costs}


def _sixteen_documents() -> dict:
  """The forward work each kernel that takes segment ids does on a row of sixteen 512-token documents at
  T=8,192 against one 8,192-token document, in tiles from the kernels' own loop bounds, at the GPU
  bodies' default blocks and NSA's paper settings (compressed blocks of 32 at stride 16, selection
  blocks of 64)."""
  T = 8192
  seg = jnp.asarray(np.repeat(np.arange(1, 17), 512)[None], jnp.int32)
  counts = {
      'flash_attention (64 x 64 tiles)': lambda s: computed_tiles(T, block_q=64, block_k=64, segment_ids=s),
      'flash_attention (128 x 128 tiles)': lambda s: computed_tiles(T, block_q=128, block_k=128,
                                                                    segment_ids=s),
      'compressed_attention (64 x 64 tiles)': lambda s: computed_tiles(
          T, block_q=64, block_k=64, key_positions=(16, 31), segment_ids=s),
      'block_selection (64 queries x 16 blocks)': lambda s: selection_tiles(
          T, block_q=64, block_s=16, sel_block=64, segment_ids=s),
  }
  return {name: {'sixteen_documents': f(seg), 'one_document': f(None)} for name, f in counts.items()}


def main(argv) -> None:
  del argv
  print(json.dumps(_alignment_costs()), flush=True)
  print(json.dumps({'tiles_at_8192': _sixteen_documents()}), flush=True)
  for variant in _VARIANTS.value:
    for kernel in _KERNELS.value:
      for packing in ('concat', 'segments'):
        print(json.dumps(_case(variant, kernel, packing)), flush=True)


if __name__ == '__main__':
  app.run(main)
