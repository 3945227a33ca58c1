"""`python -m sparse_lm.prepare` and `data.source=tokens:DIR`: shards that are deterministic, resumable
after a kill, checked at start-up, and read back as exactly the documents tokenized."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sparse_lm import data, files, prepare, tokenizer
from sparse_lm.config import base_config
from sparse_lm.errors import ConfigError
from tests.conftest import CORPUS_FILE, REPO, run_train, write_bpe


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """400 JSON-lines documents in two files and a BPE tokenizer trained here."""
  root = tmp_path_factory.mktemp('corpus')
  rng = np.random.default_rng(0)
  for k in range(2):
    with open(root / f'part{k}.jsonl', 'w', encoding='utf-8') as f:
      for i in range(200):
        words = ' '.join(rng.choice(['def', 'return', 'self', 'import', 'x', 'é'], int(rng.integers(5, 200))))
        f.write(json.dumps({'text': f'{k}.{i}: {words}'}) + '\n')
  return f'jsonl:{root}/*.jsonl', write_bpe(root / 'bpe', vocab_size=300)


@pytest.fixture(scope='module')
def prepared(corpus, tmp_path_factory):
  source, bpe = corpus
  out = tmp_path_factory.mktemp('prepared') / 'tokens'
  return out, prepare.prepare(source, f'hf:{bpe}', out, workers=2, shard_tokens=5000,
                              validation_fraction=0.05)


def _shard_hashes(out):
  return {p.name: files.sha256(p) for p in sorted(out.glob('*.arrayrecord'))}


def _config(source, tokenizer_spec='byte'):
  config = base_config()
  config.data.source, config.data.tokenizer = source, tokenizer_spec
  config.data.seq_len, config.train.batch_size, config.train.eval_batches = 32, 4, 2
  config.data.validation_fraction = 0.05
  return config


def test_manifest_counts_and_records_are_the_documents_tokenized(corpus, prepared):
  source, bpe = corpus
  out, manifest = prepared
  assert manifest['vocab_size'] == 300 and manifest['dtype'] == 'uint16'
  assert manifest['tokenizer_file'] == 'tokenizer.json'
  assert (out / 'tokenizer.json').read_bytes() == bpe.read_bytes()
  assert manifest['tokenizer_sha256'] == files.sha256(bpe) and not (out / 'progress.json').exists()
  assert len(manifest['splits']['train']) > 2  # cut at --shard_tokens
  tok = tokenizer.make_tokenizer(_config(source, f'hf:{bpe}'), str(out))
  for split in ('train', 'validation'):
    texts = [d for element in data.corpus(_config(source), split).documents for d in element]
    records = list(data.corpus(_config(f'tokens:{out}'), split).documents)
    assert [r.tolist() for r in records] == [tok.encode(t).tolist() for t in texts]
    shards = manifest['splits'][split]
    assert sum(s['documents'] for s in shards) == len(texts)
    assert sum(s['tokens'] for s in shards) == sum(len(r) for r in records)
  assert all(s['tokens'] >= 5000 for s in manifest['splits']['train'][:-1])


def test_same_input_gives_byte_identical_shards_with_any_worker_count(corpus, prepared, tmp_path):
  source, bpe = corpus
  out, manifest = prepared
  again = prepare.prepare(source, f'hf:{bpe}', tmp_path / 'one', workers=1, shard_tokens=5000,
                          validation_fraction=0.05)
  assert _shard_hashes(tmp_path / 'one') == _shard_hashes(out)
  assert again['splits'] == manifest['splits']


def test_a_killed_prepare_finishes_only_what_is_missing(corpus, prepared, tmp_path):
  """The state a kill -9 leaves after two train shards: progress.json listing them, a half-written third
  under its temporary name, no manifest. The rerun keeps the two (untouched) and writes the rest."""
  source, bpe = corpus
  out, manifest = prepared
  killed = tmp_path / 'killed'
  shutil.copytree(out, killed)
  (killed / 'manifest.json').unlink()
  kept = manifest['splits']['train'][:2]
  for shard in manifest['splits']['train'][2:] + manifest['splits']['validation']:
    (killed / shard['name']).unlink()
  (killed / 'train-00002.arrayrecord.tmp').write_bytes(b'half a shard')
  identity = {k: manifest[k] for k in ('format', 'source', 'tokenizer', 'tokenizer_sha256',
                                      'validation_fraction', 'shard_tokens')}
  (killed / 'progress.json').write_text(json.dumps({'identity': identity, 'shards': {'train': kept,
                                                                                       'validation': []}}))
  stamps = {s['name']: (killed / s['name']).stat().st_mtime_ns for s in kept}
  resumed = prepare.prepare(source, f'hf:{bpe}', killed, workers=2, shard_tokens=5000,
                            validation_fraction=0.05)
  assert resumed['splits'] == manifest['splits']
  assert _shard_hashes(killed) == _shard_hashes(out)
  assert {name: (killed / name).stat().st_mtime_ns for name in stamps} == stamps


def test_tokens_source_takes_the_manifest_tokenizer_and_batches_like_any_source(prepared, corpus):
  out, _ = prepared
  config = _config(f'tokens:{out}')
  data.resolve_tokenizer(config)
  assert config.data.tokenizer == f'hf:{out}/tokenizer.json'
  tok = tokenizer.make_tokenizer(config, str(out))
  one = [next(it) for it in [data.make_train_iterator(config, tok)] for _ in range(3)]
  two = [data.make_train_iterator(config, tok, process_index=i, process_count=2) for i in range(2)]
  for batch in one:
    halves = [next(it) for it in two]
    np.testing.assert_array_equal(np.concatenate([h['inputs'] for h in halves]), batch['inputs'])
  assert len(data.eval_batches(config, tok)) == 2
  same = _config(f'tokens:{out}', f'hf:{corpus[1]}')  # the same file elsewhere is accepted
  data.resolve_tokenizer(same)
  assert same.data.tokenizer == f'hf:{corpus[1]}'


@pytest.mark.parametrize('spec, saved', [('bpe:300', 'tokenizer.json'),
                                         ('sentencepiece:300', 'tokenizer.model')])
def test_prepare_trains_a_tokenizer_once_and_keeps_it_beside_the_shards(corpus, tmp_path, spec, saved):
  source, _ = corpus
  out = tmp_path / 'tokens'
  manifest = prepare.prepare(source, spec, out, workers=1, shard_tokens=5000, validation_fraction=0.05)
  assert manifest['tokenizer'] == spec and manifest['tokenizer_file'] == saved
  assert manifest['tokenizer_sha256'] == files.sha256(out / saved) and manifest['vocab_size'] == 300
  config = _config(f'tokens:{out}')  # the run takes the shards' tokenizer
  data.resolve_tokenizer(config)
  kind = 'hf' if saved == 'tokenizer.json' else 'sentencepiece'
  assert config.data.tokenizer == f'{kind}:{out}/{saved}'
  tok = tokenizer.make_tokenizer(config, str(tmp_path / 'run'))
  text = 'def return self é 7.3: x'
  assert tok.decode(tok.encode(text)) == text and tok.eos_id >= 0
  assert len(tok.encode(text)) < len(text.encode('utf-8'))  # it learnt merges
  first = data.corpus(config, 'train').documents[0]
  assert tok.decode(first).startswith(('0.', '1.'))
  # Killed after training and a shard: the rerun keeps the trained tokenizer and finishes the same shards.
  trained, hashes = (out / saved).read_bytes(), _shard_hashes(out)
  (out / prepare.MANIFEST).unlink()
  (out / manifest['splits']['train'][-1]['name']).unlink()
  assert prepare.prepare(source, spec, out, workers=1, shard_tokens=5000,
                         validation_fraction=0.05) == manifest
  assert (out / saved).read_bytes() == trained and _shard_hashes(out) == hashes


def _one_line(call, match):
  with pytest.raises(ConfigError, match=match) as error:
    call()
  assert '\n' not in str(error.value)
  return str(error.value)


def test_bad_corpora_and_directories_are_one_line(corpus, prepared, tmp_path):
  source, bpe = corpus
  out, manifest = prepared
  _one_line(lambda: prepare.prepare(source, 'byte', out), r'holds another corpus')
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'thesis.tex').write_text('mine')
  _one_line(lambda: prepare.prepare(source, 'byte', tmp_path / 'notes'),
            r'not a prepared corpus \(thesis.tex\)')
  _one_line(lambda: prepare.prepare(source, 'bpe:200', tmp_path / 'x'), 'VOCAB must be above 257')
  _one_line(lambda: prepare.prepare(source, 'ids:8', tmp_path / 'x'), 'is not one of byte, hf:PATH')
  _one_line(lambda: prepare.prepare(source, 'bpe:300', out), r'holds another corpus')  # before training
  _one_line(lambda: prepare.prepare('bin:/x/*.bin', 'byte', tmp_path / 'x'), 'is not text')
  _one_line(lambda: data.check_source(_config(f'tokens:{tmp_path}')), 'has no manifest.json')
  other = write_bpe(tmp_path / 'other', vocab_size=280)
  _one_line(lambda: data.resolve_tokenizer(_config(f'tokens:{out}', f'hf:{other}')),
            'is not the tokenizer the shards in')
  damaged = tmp_path / 'damaged'
  shutil.copytree(out, damaged)
  shard = damaged / manifest['splits']['train'][1]['name']
  shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
  _one_line(lambda: data.check_source(_config(f'tokens:{damaged}')), 'train-00001.arrayrecord')


def test_prepare_then_train_sample_and_evaluate_from_the_command_line(tmp_path):
  """As a user runs it: prepare from the command line, train on the shards (the tokenizer taken from
  the manifest), then evaluate, which decodes with the run's copy of it."""
  bpe = write_bpe(tmp_path / 'bpe', vocab_size=300)
  out = tmp_path / 'tokens'
  made = subprocess.run([sys.executable, '-m', 'sparse_lm.prepare', f'--source=text:{CORPUS_FILE}',
                         f'--tokenizer=hf:{bpe}', f'--out={out}', '--workers=2', '--shard_tokens=50000'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert made.returncode == 0, made.stderr[-2000:]
  assert re.search(r'^prepare: train \d+ documents, [\d,]+ tokens in \d+ shards; validation ',
                   made.stderr.strip().splitlines()[-1], re.M), made.stderr[-2000:]
  assert json.loads(made.stdout)['vocab_size'] == 300
  run_train(tmp_path / 'run', f'--config.data.source=tokens:{out}', '--config.train.steps=10')
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['data']['tokenizer'] == (
      f'hf:{out}/tokenizer.json')
  assert (tmp_path / 'run' / 'tokenizer.json').read_bytes() == bpe.read_bytes()
  evaluated = subprocess.run([sys.executable, '-m', 'sparse_lm.evaluate', f'--workdir={tmp_path / "run"}',
                              '--task=perplexity', '--seq_len=64'], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert 0 < json.loads(evaluated.stdout)['eval_bpb'] < 10
