"""How fast the data path feeds a host, what `prepare` costs, and whether the iterator's memory grows.

    python benchmarks/data.py [--scratch=/tmp/sparse_lm_data_bench] [--batches=256] [--mb=20]

Everything is made here, from the embedded corpus (this Python's standard library): JSON-lines documents
of 1-6 KB (`--mb` of them, and ten times that for the memory check), a byte-level BPE of 16,384 pieces
trained on them with the `tokenizers` trainer, and nanoGPT `.bin` shards of the same tokens. Reported:

- the train iterator alone (`make_train_iterator`, batch 64 x 2,048, shuffling on), in tokens/s, for
  `tokens:` (prepared shards, cut as `concat` and as `segments`, the default), `bin:` (nanoGPT shards)
  and `jsonl:` tokenized on the fly (`concat`, as first recorded). The first
  batch fills each of the 64 shard streams' shuffle windows (`data.shuffle_buffer`, 256 windows); the
  rate is over the next `--batches` (256 by default, which includes one refill of every window), so it
  is the steady rate, not the start-up;
- `prepare` with 1 and 2 workers against the bare `tokenizers` `encode_batch` on the same documents
  (one thread: `RAYON_NUM_THREADS=1`, so a worker compares with a worker);
- the peak resident memory of a process iterating `tokens:` over the corpus and over ten times it.

One process on this machine; nothing else should run beside it. Numbers go in BENCHMARKS.md.
"""

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

os.environ.setdefault('RAYON_NUM_THREADS', '1')  # before tokenizers starts its pool
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from sparse_lm import data, files, prepare, tokenizer  # noqa: E402
from sparse_lm.config import base_config  # noqa: E402

_SCRATCH = flags.DEFINE_string('scratch', '/tmp/sparse_lm_data_bench', 'Where the corpora are made.')
_BATCHES = flags.DEFINE_integer('batches', 256, 'Timed batches per iterator, after the first (which fills '
                                'every shard\'s shuffle window): 256 spans one refill of each.')
_MB = flags.DEFINE_integer('mb', 20, 'Megabytes of JSON-lines text in the 1x corpus.')
_MEMORY_ONLY = flags.DEFINE_string('memory_child', '', 'Internal: iterate this tokens: source, print RSS.')

BATCH, SEQ_LEN, VOCAB = 64, 2048, 16_384
HELD_OUT = 0.05  # enough validation tokens for one eval batch of 64 x 2,048 in the smallest corpus


def _documents(megabytes: int):
  """Documents of 1-6 KB cut from the stdlib's UTF-8 files, repeated until `megabytes`."""
  rng = np.random.default_rng(0)
  texts = []
  for f in data._stdlib_files():  # noqa: SLF001
    try:
      texts.append(pathlib.Path(f.path).read_text(encoding='utf-8'))
    except UnicodeDecodeError:
      continue
  blob, total, start = '\n'.join(texts), 0, 0
  while total < megabytes * 2**20:
    size = int(rng.integers(1000, 6000))
    if start + size > len(blob):
      start = 0
    yield blob[start:start + size]
    start, total = start + size, total + size


def _write_jsonl(path: pathlib.Path, megabytes: int) -> None:
  if path.exists():
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(f'{path}.tmp', 'w', encoding='utf-8') as f:
    for doc in _documents(megabytes):
      f.write(json.dumps({'text': doc}) + '\n')
  os.replace(f'{path}.tmp', path)


def _bpe(scratch: pathlib.Path, corpus: pathlib.Path) -> pathlib.Path:
  path = scratch / 'bpe' / 'tokenizer.json'
  if path.exists():
    return path
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=['<|endoftext|>'], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  lines = (json.loads(line)['text'] for line in open(corpus, encoding='utf-8'))
  tok.train_from_iterator(lines, trainer)
  path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(path))
  return path


def _config(source: str, tokenizer_spec: str = 'byte', packing: str = 'concat'):
  c = base_config()
  c.data.source, c.data.tokenizer, c.data.packing = source, tokenizer_spec, packing
  c.data.seq_len, c.train.batch_size, c.data.validation_fraction = SEQ_LEN, BATCH, HELD_OUT
  data.resolve_tokenizer(c)
  return c


def _iterator_rate(config, scratch: pathlib.Path) -> float:
  tok = tokenizer.make_tokenizer(config, str(scratch / 'tok_copies' / str(abs(hash(config.data.source)))))
  iterator = data.make_train_iterator(config, tok)
  next(iterator)
  started = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(iterator)
  return _BATCHES.value * BATCH * SEQ_LEN / (time.perf_counter() - started)


def _prepare_rate(source: str, spec: str, out: pathlib.Path, workers: int) -> tuple[float, int]:
  started = time.perf_counter()
  manifest = prepare.prepare(source, spec, out, workers=workers, shard_tokens=50_000_000,
                             validation_fraction=HELD_OUT)
  seconds = time.perf_counter() - started
  tokens = sum(s['tokens'] for shards in manifest['splits'].values() for s in shards)
  return tokens / seconds, tokens


def _bare_encode_rate(corpus: pathlib.Path, bpe: pathlib.Path) -> float:
  tok = tokenizer.make_tokenizer(_config('stdlib', f'hf:{bpe}'), str(bpe.parent / 'copy'))
  docs = [json.loads(line)['text'] for line in open(corpus, encoding='utf-8')]
  started = time.perf_counter()
  tokens = sum(len(ids) for i in range(0, len(docs), 256) for ids in tok.encode_batch(docs[i:i + 256]))
  return tokens / (time.perf_counter() - started)


def _peak_rss_mib(source: str) -> float:
  out = subprocess.run([sys.executable, __file__, f'--memory_child={source}',
                        f'--batches={_BATCHES.value}'], capture_output=True, text=True, check=True)
  return float(out.stdout.strip().splitlines()[-1])


def _memory_child(source: str) -> None:
  config = _config(source)
  iterator = data.make_train_iterator(config, tokenizer.make_tokenizer(config, '/nonexistent'))
  for _ in range(_BATCHES.value + 1):
    next(iterator)
  print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv) -> None:
  del argv
  if _MEMORY_ONLY.value:
    _memory_child(_MEMORY_ONLY.value)
    return
  scratch = pathlib.Path(_SCRATCH.value)
  one, ten = scratch / 'x1' / 'docs.jsonl', scratch / 'x10' / 'docs.jsonl'
  _write_jsonl(one, _MB.value)
  bpe = _bpe(scratch, one)
  rows = {}

  bare = _bare_encode_rate(one, bpe)
  for workers in (1, 2):
    rate, tokens = _prepare_rate(f'jsonl:{one}', f'hf:{bpe}', scratch / f'tokens_w{workers}', workers)
    rows[f'prepare, {workers} worker(s)'] = {'tokens_per_s': rate, 'tokens': tokens,
                                             'of_bare_encode_batch': rate / bare}
  rows['bare tokenizers encode_batch, 1 thread'] = {'tokens_per_s': bare}
  same = {p.name: files.sha256(p) for p in (scratch / 'tokens_w1').glob('*.arrayrecord')} == {
      p.name: files.sha256(p) for p in (scratch / 'tokens_w2').glob('*.arrayrecord')}
  rows['prepare, 1 vs 2 workers'] = {'byte_identical_shards': same}

  records = data.corpus(_config(f'tokens:{scratch / "tokens_w1"}'), 'train').documents
  bin_dir = scratch / 'bin'
  if not bin_dir.exists():
    bin_dir.mkdir()
    stream = np.concatenate([np.append(records[i], 0) for i in range(len(records))])
    for k, part in enumerate(np.array_split(stream, 4)):
      files.write_bin(str(bin_dir / f'train_{k:03d}.bin'), part)
  for name, config in (('tokens: (prepared shards)', _config(f'tokens:{scratch / "tokens_w1"}')),
                       ('tokens: (prepared shards), data.packing=segments',
                        _config(f'tokens:{scratch / "tokens_w1"}', packing='segments')),
                       ('bin: (nanoGPT shards)', _config(f'bin:{bin_dir}/*.bin', f'hf:{bpe}')),
                       ('jsonl: on the fly, BPE', _config(f'jsonl:{one}', f'hf:{bpe}')),
                       ('jsonl: on the fly, bytes', _config(f'jsonl:{one}'))):
    rows[f'iterator, {name}'] = {'tokens_per_s': _iterator_rate(config, scratch)}

  if not (scratch / 'tokens_x10' / 'manifest.json').exists():
    _write_jsonl(ten, 10 * _MB.value)
    for corpus, out in ((ten, 'tokens_x10'), (one, 'tokens_x1')):
      prepare.prepare(f'jsonl:{corpus}', 'byte', scratch / out, workers=2, shard_tokens=100_000_000,
                      validation_fraction=HELD_OUT)
  for scale in ('x1', 'x10'):
    rows[f'iterator peak RSS, tokens: {scale} corpus'] = {
        'MiB': _peak_rss_mib(f'tokens:{scratch / f"tokens_{scale}"}'),
        'corpus_tokens': sum(s['tokens'] for s in json.loads(
            (scratch / f'tokens_{scale}' / 'manifest.json').read_text())['splits']['train'])}
  print(json.dumps(rows, indent=2))


if __name__ == '__main__':
  app.run(main)
