"""Tokenizes a corpus once into ArrayRecord shards that `data.source=tokens:DIR` trains from.

    python -m sparse_lm.prepare --source=jsonl:/data/web/*.jsonl --tokenizer=hf:/tok/tokenizer.json \
        --out=/data/web_tokens [--workers=N] [--shard_tokens=100000000] [--validation_fraction=0.02]

Any `data.source` that yields text (stdlib, text:, jsonl:, parquet:, hf:, tfds:) and a tokenizer: one
given (byte, hf:PATH, sentencepiece:PATH.model) or one trained here once, on a sample of the whole train
split, and saved beside the shards (`sentencepiece:VOCAB`, or `bpe:VOCAB`: a byte-level BPE by the
`tokenizers` trainer, GPT-2's scheme, with `<|endoftext|>`); a rerun reuses the saved one. Each record
is one document's token ids (no EOS: the reader appends the tokenizer's), as uint16 where the vocabulary
fits, else uint32.
The split is the source's own (`--validation_fraction` as `data.validation_fraction`), so training on the
shards holds out exactly what training on the source would.

`DIR` gets `train-NNNNN.arrayrecord` and `validation-NNNNN.arrayrecord` shards, a copy of the tokenizer
file (as a run keeps one) and `manifest.json`: the source, the tokenizer (spec, file and SHA-256),
vocabulary size, BOS/EOS ids, token dtype, and per shard its pieces, documents, tokens and SHA-256. A
shard ends at the first piece boundary past `--shard_tokens`. The pieces are the source's, tokenized in
order by `--workers` processes, so the same input gives byte-identical shards with any number of them.

Resumable: a shard is written under a temporary name and renamed when whole, and `progress.json`
(rewritten whole after each shard) lists the finished ones with their hashes; a rerun after `kill -9`
keeps those and writes the rest. `manifest.json` comes last: a directory without one is not a corpus.
`--out` holding another corpus (another source, tokenizer or split), or other files, is refused.
"""

import dataclasses
import json
import multiprocessing
import os
import pathlib
import sys
import time

import ml_collections
import numpy as np
import tqdm
from absl import flags, logging
from array_record.python.array_record_module import ArrayRecordWriter

from sparse_lm import cli, data, files, tokenizer
from sparse_lm.config import base_config
from sparse_lm.errors import ConfigError

MANIFEST = 'manifest.json'
PROGRESS = 'progress.json'
SPLITS = ('train', 'validation')
FORMAT_VERSION = 1
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model')


def _write_json(path: pathlib.Path, value: dict) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(value, indent=2) + '\n')
  os.replace(tmp, path)


def token_dtype(vocab_size: int) -> str:
  return 'uint16' if vocab_size <= 1 << 16 else 'uint32'


# ----------------------------------------------------------------------------- workers

_WORKER = {}  # each worker process's config, tokenizer and splits


def _start_worker(config_json: str, out: str) -> None:
  config = ml_collections.ConfigDict(json.loads(config_json))
  tok = tokenizer.make_tokenizer(config, out)
  _WORKER.update(tok=tok, dtype=token_dtype(tok.vocab_size),
                 splits={split: data.corpus(config, split).documents for split in SPLITS})


def _tokenize_piece(piece: tuple[str, int]) -> list[bytes]:
  """The records of one piece of a split: each document's ids."""
  split, index = piece
  element = _WORKER['splits'][split][index]
  documents = element if isinstance(element, list) else [element]
  tok = _WORKER['tok']
  ids = tok.encode_batch(documents) if hasattr(tok, 'encode_batch') else [tok.encode(d) for d in documents]
  return [np.asarray(x, _WORKER['dtype']).tobytes() for x in ids]


# ----------------------------------------------------------------------------- shards

@dataclasses.dataclass
class Shard:
  name: str
  pieces: list[int]  # [first, stop) of the split's pieces
  documents: int
  tokens: int
  sha256: str


def _finished_shards(out: pathlib.Path, identity: dict) -> dict[str, list[Shard]]:
  """The shards a killed run finished (listed in progress.json, and whole on disk)."""
  path = out / PROGRESS
  if not path.exists():
    return {split: [] for split in SPLITS}
  progress = json.loads(path.read_text())
  if progress['identity'] != identity:
    changed = sorted(k for k in identity if progress['identity'].get(k) != identity[k])
    raise ConfigError(f'--out={out} holds another corpus being prepared (it differs in '
                      f'{", ".join(changed)}); use another --out')
  shards = {}
  for split in SPLITS:
    listed = [Shard(**s) for s in progress['shards'][split]]
    whole = [(out / s.name).exists() and files.sha256(out / s.name) == s.sha256 for s in listed]
    shards[split] = listed[:whole.index(False)] if False in whole else listed
  return shards


def _check_out(out: pathlib.Path, identity: dict) -> dict | None:
  """The manifest of a corpus already prepared in `out` with the same identity (nothing to do), None for
  a new, empty or unfinished one; ConfigError for another corpus or other files."""
  if (out / MANIFEST).exists():
    manifest = json.loads((out / MANIFEST).read_text())
    if {k: manifest.get(k) for k in identity} != identity:
      raise ConfigError(f'--out={out} holds another corpus ({manifest.get("source")!r} tokenized with '
                        f'{manifest.get("tokenizer")!r}); use another --out')
    return manifest
  if out.exists():
    foreign = [p.name for p in out.iterdir() if not (p.name in (PROGRESS, *_TOKENIZER_FILES) or
                                                     p.name.endswith(('.arrayrecord', '.tmp')))]
    if foreign:
      raise ConfigError(f'--out={out} holds files that are not a prepared corpus '
                        f'({", ".join(sorted(foreign)[:3])}); use a new or empty directory')
  return None


def _to_train(spec: str) -> tuple[str, int] | None:
  """('sentencepiece' or 'bpe', VOCAB) for a tokenizer prepare trains, None for one it is given."""
  kind, _, vocab = spec.partition(':')
  if kind == 'ids' or (kind == 'bpe' and not vocab.isdigit()):
    raise ConfigError(f'--tokenizer={spec!r} is not one of byte, hf:PATH, sentencepiece:PATH.model, or '
                      'sentencepiece:VOCAB / bpe:VOCAB (trained here once, saved beside the shards)')
  if kind == 'bpe' and int(vocab) <= 257:
    raise ConfigError(f'--tokenizer={spec!r}: VOCAB must be above 257 (the 256 byte symbols and the '
                      'end-of-document token come first)')
  return (kind, int(vocab)) if kind in ('sentencepiece', 'bpe') and vocab.isdigit() else None


def _trained_tokenizer(config, kind: str, vocab_size: int, out: pathlib.Path) -> str:
  """The spec of the tokenizer trained for this corpus and kept in `out` (trained now, on a sample of the
  whole train split, unless a killed prepare already saved it)."""
  path = out / ('tokenizer.model' if kind == 'sentencepiece' else 'tokenizer.json')
  if not path.exists():
    out.mkdir(parents=True, exist_ok=True)
    print(f'prepare: training a {kind} tokenizer of {vocab_size:,} tokens on a sample of the train split',
          file=sys.stderr)
    if kind == 'sentencepiece':
      tokenizer.train_sentencepiece(data.train_documents(config), vocab_size, str(path))
    else:
      tokenizer.train_bpe(data.train_documents(config), vocab_size, str(path))
  return f'{"sentencepiece" if kind == "sentencepiece" else "hf"}:{path}'


def prepare(source: str, tokenizer_spec: str, out: str | pathlib.Path, *, workers: int = 1,
            shard_tokens: int = 100_000_000, validation_fraction: float = 0.02) -> dict:
  """Tokenizes `source` into shards in `out` (finishing what a killed run left); returns the manifest."""
  out = pathlib.Path(out).resolve()
  if workers < 1 or shard_tokens < 1:
    raise ConfigError(f'--workers={workers} and --shard_tokens={shard_tokens} must be at least 1')
  if source.split(':')[0] in ('bin', 'tokens', 'mqar', 'passkey'):
    raise ConfigError(f'--source={source!r} is not text; prepare tokenizes text sources')
  config = base_config()
  config.data.source, config.data.tokenizer = source, tokenizer_spec
  config.data.validation_fraction = validation_fraction
  identity = {'format': FORMAT_VERSION, 'source': source, 'tokenizer': tokenizer_spec,
              'validation_fraction': validation_fraction, 'shard_tokens': shard_tokens}
  to_train = _to_train(tokenizer_spec)
  if not to_train or to_train[0] == 'sentencepiece':
    tokenizer.vocab_size_for(config)  # a missing or broken tokenizer file, or a bad VOCAB, fails here
  data.check_source(config)
  manifest = _check_out(out, identity)  # another corpus in `out` is refused before any training
  if manifest is not None:
    return manifest
  if to_train:
    config.data.tokenizer = _trained_tokenizer(config, *to_train, out)
  given = None if tokenizer_spec == 'byte' else pathlib.Path(tokenizer.given_file(config.data.tokenizer))
  identity['tokenizer_sha256'] = files.sha256(given) if given else None
  manifest = _check_out(out, identity)
  if manifest is not None:
    return manifest
  shards = _finished_shards(out, identity)
  out.mkdir(parents=True, exist_ok=True)
  tok = tokenizer.make_tokenizer(config, str(out))  # copies the tokenizer file into `out`
  itemsize = np.dtype(token_dtype(tok.vocab_size)).itemsize
  context = multiprocessing.get_context('spawn')  # workers that never inherit a started JAX
  with context.Pool(workers, _start_worker, (config.to_json(), str(out))) as pool:
    for split in SPLITS:
      _prepare_split(pool, config, split, out, shards, identity, shard_tokens, itemsize)
  manifest = {**identity, 'tokenizer_file': given and tokenizer.copy_name(config.data.tokenizer),
              'vocab_size': tok.vocab_size, 'bos_id': int(tok.bos_id), 'eos_id': int(tok.eos_id),
              'dtype': token_dtype(tok.vocab_size),
              'splits': {split: [dataclasses.asdict(s) for s in shards[split]] for split in SPLITS}}
  _write_json(out / MANIFEST, manifest)
  (out / PROGRESS).unlink(missing_ok=True)
  return manifest


def _prepare_split(pool, config, split: str, out: pathlib.Path, shards: dict, identity: dict,
                   shard_tokens: int, itemsize: int) -> None:
  num_pieces = len(data.corpus(config, split).documents)
  first = shards[split][-1].pieces[1] if shards[split] else 0
  records, tokens, start = [], 0, first
  new_docs, new_tokens, started = 0, 0, time.monotonic()

  def write_shard(stop: int) -> None:
    nonlocal records, tokens, start
    name = f'{split}-{len(shards[split]):05d}.arrayrecord'
    writer = ArrayRecordWriter(str(out / f'{name}.tmp'), 'group_size:1')
    for record in records:
      writer.write(record)
    writer.close()
    os.replace(out / f'{name}.tmp', out / name)
    shards[split].append(Shard(name, [start, stop], len(records), tokens, files.sha256(out / name)))
    _write_json(out / PROGRESS, {'identity': identity,
                                 'shards': {s: [dataclasses.asdict(x) for x in shards[s]] for s in SPLITS}})
    records, tokens, start = [], 0, stop

  with tqdm.tqdm(total=num_pieces, initial=first, desc=f'prepare {split}', unit='piece', file=sys.stderr,
                 dynamic_ncols=True) as bar:
    pieces = ((split, i) for i in range(first, num_pieces))
    for index, piece in enumerate(pool.imap(_tokenize_piece, pieces, chunksize=4), first):
      piece_tokens = sum(len(r) for r in piece) // itemsize
      records += piece
      tokens += piece_tokens
      new_docs, new_tokens = new_docs + len(piece), new_tokens + piece_tokens
      seconds = max(time.monotonic() - started, 1e-9)
      bar.set_postfix(docs_s=f'{new_docs / seconds:,.0f}', tok_s=f'{new_tokens / seconds:,.0f}',
                      refresh=False)
      bar.update()
      if tokens >= shard_tokens:
        write_shard(index + 1)
  if records or not shards[split]:
    write_shard(num_pieces)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    manifest = prepare(_SOURCE.value, _TOKENIZER.value, _OUT.value, workers=_WORKERS.value,
                       shard_tokens=_SHARD_TOKENS.value, validation_fraction=_VALIDATION.value)
  except ConfigError as e:
    cli.fail('prepare', str(e), status=1)
  counts = {split: (sum(s['documents'] for s in shards), sum(s['tokens'] for s in shards), len(shards))
            for split, shards in manifest['splits'].items()}
  print('prepare: ' + '; '.join(f'{split} {docs:,} documents, {tokens:,} tokens in {n} shards'
                                for split, (docs, tokens, n) in counts.items()) + f' in {_OUT.value}',
        file=sys.stderr)
  print(json.dumps(manifest))


if __name__ == '__main__':
  _SOURCE = flags.DEFINE_string('source', None, 'A text data.source (stdlib, text:, jsonl:, parquet:, '
                                'hf:, tfds:).', required=True)
  _TOKENIZER = flags.DEFINE_string('tokenizer', 'byte', 'byte, hf:PATH, sentencepiece:PATH.model, or '
                                   'sentencepiece:VOCAB / bpe:VOCAB to train one here.')
  _OUT = flags.DEFINE_string('out', None, 'The directory of the shards and manifest.', required=True)
  _WORKERS = flags.DEFINE_integer('workers', max(1, (os.cpu_count() or 2) - 1), 'Tokenizing processes.')
  _SHARD_TOKENS = flags.DEFINE_integer('shard_tokens', 100_000_000, 'Tokens per shard (at least).')
  _VALIDATION = flags.DEFINE_float('validation_fraction', 0.02, 'As data.validation_fraction.')
  cli.run(main, 'prepare')
