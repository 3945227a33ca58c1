import json
import re

import grain
import numpy as np
import pytest

from sparse_lm import config as config_lib
from sparse_lm import data
from sparse_lm import tokenizer as tokenizer_lib
from sparse_lm.config import ConfigError
from tests.conftest import CORPUS_FILE

BYTES = tokenizer_lib.ByteTokenizer()


def _config(source=f'text:{CORPUS_FILE}', seq_len=64, batch_size=4, seed=0):
  config = config_lib.base_config()
  config.data.source = source
  if source.startswith('bin:'):  # windows without document boundaries: concatenation only
    config.data.packing = 'concat'
  config.data.seq_len = seq_len
  config.data.shuffle_buffer = 16
  config.train.batch_size = batch_size
  config.train.seed = seed
  config.train.eval_batches = 3
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
    np.testing.assert_array_equal(x['targets'], y['targets'])


def _write_letter_files(tmp_path, num_files, size):
  """File k holds one letter, so a window's letters name the files it came from."""
  for k in range(num_files):
    (tmp_path / f'{k:02d}.txt').write_text(chr(ord('a') + k) * size)
  return f'text:{tmp_path}/**/*.txt'


def test_text_split_is_disjoint_deterministic_and_complete():
  config = _config()
  train = list(data.corpus(config, 'train').documents)
  validation = list(data.corpus(config, 'validation').documents)
  with open(CORPUS_FILE, encoding='utf-8') as f:
    assert ''.join(train) + ''.join(validation) == f.read()
  assert len(train) > 10  # cut into pieces, so there is something to shuffle
  assert list(data.corpus(config, 'validation').documents) == validation


def test_text_pieces_keep_multibyte_characters_whole(tmp_path):
  text = 'é日本語x' * 20_000  # crosses 64 KiB piece boundaries mid-character
  (tmp_path / 'a.txt').write_text(text, encoding='utf-8')
  config = _config(source=f'text:{tmp_path}/a.txt')
  pieces = [*data.corpus(config, 'train').documents, *data.corpus(config, 'validation').documents]
  assert len(pieces) > 2
  assert ''.join(pieces) == text


def test_stdlib_split_holds_out_the_fraction():
  config = _config(source='stdlib')
  train, validation = data.corpus(config, 'train'), data.corpus(config, 'validation')
  total = sum(f.size for f in data._stdlib_files())
  assert train.num_bytes + validation.num_bytes == total
  assert abs(validation.num_bytes - 0.02 * total) <= 1
  assert isinstance(validation.documents[0], str)
  data.check_source(config)


def _bytes_of(pieces):
  return sum(len(text.encode('utf-8')) for text in pieces)


def _held_out(config):
  train, validation = (list(data.corpus(config, split).documents) for split in ('train', 'validation'))
  return _bytes_of(validation) / (_bytes_of(train) + _bytes_of(validation))


@pytest.mark.parametrize('layout', ['one big file', 'many small files', 'a mix'])
@pytest.mark.parametrize('seq_len', [16, 256, 2048])
@pytest.mark.parametrize('fraction', [0.02, 0.1, 0.3])
def test_text_validation_is_the_configured_fraction(tmp_path, layout, seq_len, fraction):
  """Validation holds `data.validation_fraction` of the bytes within a character, whatever the files
  and the sequence length (it used to be each file's tail of at least seq_len + 1 bytes: 11.7% of a
  tree of small files at seq_len 2048)."""
  rng = np.random.default_rng(0)
  sizes = {'one big file': [300_000], 'many small files': rng.integers(200, 3000, 200),
           'a mix': [150_000, *rng.integers(100, 5000, 60)]}[layout]
  for k, size in enumerate(sizes):
    (tmp_path / f'{k:03d}.txt').write_text('é' + 'x' * (int(size) - 2))  # one 2-byte character each
  config = _config(source=f'text:{tmp_path}/*.txt', seq_len=seq_len)
  config.data.validation_fraction = fraction
  assert _held_out(config) == pytest.approx(fraction, abs=2 / sum(sizes))


def test_text_split_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
  for k in range(20):
    (tmp_path / f'{k}.txt').write_text(f'{k} ' * 100)
  absolute = list(data.corpus(_config(source=f'text:{tmp_path}/*.txt'), 'validation').documents)
  monkeypatch.chdir(tmp_path.parent)
  relative = list(data.corpus(_config(source=f'text:{tmp_path.name}/*.txt'), 'validation').documents)
  assert absolute == relative


@pytest.mark.parametrize('name,content,says', [
    ('tokens.npy', b'\x93NUMPY', 'NumPy'),
    ('train.bin', b'\x01\x02', 'nanoGPT'),
    ('docs.jsonl', b'{"text": "a"}\n', 'JSON lines'),
    ('docs.parquet', b'PAR1', 'Parquet'),
    ('shard.arrayrecord', b'x', 'ArrayRecord'),
    ('blob.dat', b'abc\0def', 'NUL bytes'),
    ('latin1.txt', 'café'.encode('latin-1') + b' and more', 'not UTF-8'),
])
def test_text_refuses_what_is_not_text(tmp_path, name, content, says):
  (tmp_path / 'fine.txt').write_text('plain text ' * 100)
  (tmp_path / name).write_bytes(content)
  message = _raises_one_line(_config(source=f'text:{tmp_path}/*'), 'data.source')
  assert name in message and says in message and 'UTF-8 text files only' in message


def test_batches_have_shapes_and_shifted_targets():
  config = _config()
  batches = _take(data.make_train_iterator(config, BYTES), 3)
  with open(CORPUS_FILE, encoding='utf-8') as f:
    text = f.read()
  for batch in batches:
    assert batch['inputs'].shape == batch['targets'].shape == (4, 64)
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
    np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
    for row in batch['inputs']:
      if BYTES.eos_id not in row:
        assert BYTES.decode(row) in text


def _assert_resumes(config, before: int, after: int) -> None:
  """After `before` batches, the state through JSON (as a checkpoint keeps it) restores a fresh iterator
  to give the next `after` batches exactly."""
  iterator = data.make_train_iterator(config, BYTES)
  _take(iterator, before)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, after)
  restored = data.make_train_iterator(config, BYTES)
  restored.set_state(state)
  _assert_same_batches(_take(restored, after), expected)


def test_state_round_trip_through_json():
  _assert_resumes(_config(), 7, 5)


def test_state_round_trip_from_the_start():
  # The fresh state has no partial document; grain marks that (-1, -1), which JSON makes a list.
  config = _config()
  iterator = data.make_train_iterator(config, BYTES)
  state = json.loads(json.dumps(iterator.get_state()))
  restored = data.make_train_iterator(config, BYTES)
  _take(restored, 3)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 4), _take(iterator, 4))


def test_seed_decides_the_order():
  first = _take(data.make_train_iterator(_config(seed=1), BYTES), 3)
  _assert_same_batches(_take(data.make_train_iterator(_config(seed=1), BYTES), 3), first)
  other = _take(data.make_train_iterator(_config(seed=2), BYTES), 3)
  assert not np.array_equal(other[0]['inputs'], first[0]['inputs'])


def _letters_seen(batches):
  return {chr(t) for batch in batches for t in np.unique(batch['inputs']) if t < 256}


def test_hosts_see_disjoint_documents_that_cover_the_data(tmp_path):
  config = _config(source=_write_letter_files(tmp_path, num_files=6, size=200), seq_len=16)
  config.data.validation_fraction = 0.1  # 120 bytes, enough for an eval batch, from one file's tail
  seen = [_letters_seen(_take(data.make_train_iterator(config, BYTES, process_index=i, process_count=2), 40))
          for i in range(2)]
  assert seen[0] and seen[1]
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set('abcdef')


def test_epochs_are_reshuffled(tmp_path):
  # 9 files of 33 bytes, one ninth held out: one whole file is validation, and each of the other 8 (33
  # bytes and an EOS) makes exactly two 17-token windows.
  config = _config(source=_write_letter_files(tmp_path, num_files=9, size=33), seq_len=16, batch_size=1)
  config.data.validation_fraction = 1 / 9
  config.data.shuffle_buffer = 1
  config.data.packing = 'concat'  # the window arithmetic above
  letters = sorted(text[0] for text in data.corpus(config, 'train').documents)
  assert len(letters) == 8 and not set(letters) & {t[0] for t in data.corpus(config, 'validation').documents}
  rows = [batch['inputs'][0] for batch in _take(data.make_train_iterator(config, BYTES), 4 * 16)]
  epochs = [''.join(chr(row[0]) for row in rows[e * 16:(e + 1) * 16:2]) for e in range(4)]
  assert all(sorted(order) == letters for order in epochs)
  assert len(set(epochs)) > 1


def test_eval_batches_are_deterministic_and_bounded():
  config = _config()
  batches = data.eval_batches(config, BYTES)
  assert len(batches) == 3
  _assert_same_batches(data.eval_batches(config, BYTES), batches)
  validation_text = ''.join(data.corpus(config, 'validation').documents)
  assert validation_text.startswith(BYTES.decode(batches[0]['inputs'][0]))  # in order, unshuffled
  config.train.eval_batches = 1000
  assert 1 <= len(data.eval_batches(config, BYTES)) < 1000


def test_eval_batches_split_rows_over_hosts():
  config = _config()
  whole = data.eval_batches(config, BYTES)
  parts = [data.eval_batches(config, BYTES, process_index=i, process_count=2) for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for batch, half0, half1 in zip(whole, *parts, strict=True):
    np.testing.assert_array_equal(np.concatenate([half0['inputs'], half1['inputs']]), batch['inputs'])


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _config(source='tfds:lm1b', seq_len=16, batch_size=2)
  config.data.tfds_split_eval = 'test'
  config.data.tfds_download = True  # the mock's download_and_prepare writes nothing
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    batch = next(data.make_train_iterator(config, BYTES))
    assert batch['inputs'].shape == (2, 16)
    assert len(data.eval_batches(config, BYTES)) >= 1


def test_tfds_dataset_not_prepared_fails_at_once_without_downloading(tmp_path, monkeypatch):
  """A known dataset that is not prepared: one line naming the directory and the two ways on, within
  seconds, and nothing written (no download directory, no dataset folder)."""
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  config = _config(source='tfds:tiny_shakespeare')
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  message = _raises_one_line(config, 'data.source')
  assert 'not prepared in' in message and 'tfds build tiny_shakespeare' in message
  assert 'data.tfds_download=True' in message
  assert not list(tmp_path.iterdir())


def _raises_one_line(config, key, call=data.check_source):
  with pytest.raises(ConfigError, match=key) as error:
    call(config)
  assert '\n' not in str(error.value)
  return str(error.value)


def test_glob_without_match(tmp_path):
  message = _raises_one_line(_config(source=f'text:{tmp_path}/*.nothing'), 'data.source')
  assert '*.nothing' in message


@pytest.mark.parametrize('source', ['wikipedia', 'stdlib:extra', 'tfds:', ''])
def test_unknown_source(source):
  _raises_one_line(_config(source=source), 'data.source')


def test_seq_len_longer_than_the_corpus(tmp_path):
  (tmp_path / 'small.txt').write_text('x' * 1000)
  message = _raises_one_line(_config(source=f'text:{tmp_path}/small.txt', seq_len=4096), 'data.seq_len')
  assert 'tokens' in message
  _raises_one_line(_config(source=f'text:{tmp_path}/small.txt', seq_len=4096), 'data.seq_len',
                   lambda config: data.make_train_iterator(config, BYTES))


def test_validation_too_small_for_one_batch(tmp_path):
  (tmp_path / 'small.txt').write_text('x' * 5000)
  config = _config(source=f'text:{tmp_path}/small.txt', seq_len=64, batch_size=64)
  message = _raises_one_line(config, 'train.batch_size', lambda config: data.eval_batches(config, BYTES))
  assert 'data.seq_len' in message


def test_validation_too_small_for_one_batch_after_tokenizing(tmp_path):
  """The byte count lets it pass; the exact token count in eval_batches does not."""
  (tmp_path / 'small.txt').write_text('x' * 5000)
  config = _config(source=f'text:{tmp_path}/small.txt', seq_len=16, batch_size=4)
  config.data.validation_fraction = 0.02  # 100 bytes, enough for 4 windows of 17 byte tokens
  data.check_source(config)

  class TwoBytesPerToken(tokenizer_lib.ByteTokenizer):
    def encode(self, text):
      return super().encode(text)[::2]

  _raises_one_line(config, 'train.batch_size', lambda config: data.eval_batches(config, TwoBytesPerToken()))


def test_batch_size_must_divide_over_hosts():
  _raises_one_line(_config(batch_size=3), 'train.batch_size',
                   lambda config: data.make_train_iterator(config, BYTES, process_count=2))


def test_global_batches_do_not_depend_on_the_process_count():
  """Hosts' rows, stacked, are the one-process batch: the shards, not the hosts, fix the data."""
  config = _config(batch_size=8)
  config.data.num_shards = 4  # the fewest that 2 and 4 hosts split (each shard's stream costs seconds)
  whole = _take(data.make_train_iterator(config, BYTES), 5)
  for processes in (2, 4):
    parts = [_take(data.make_train_iterator(config, BYTES, process_index=i, process_count=processes), 5)
             for i in range(processes)]
    for step, batch in enumerate(whole):
      np.testing.assert_array_equal(np.concatenate([p[step]['inputs'] for p in parts]), batch['inputs'])


def test_state_moves_between_process_counts():
  """States saved by 2 hosts, merged as a checkpoint holds them, resume 1 host exactly; and back."""
  config = _config(batch_size=8)
  config.data.num_shards = 2  # one shard per host: each shard's restore replays its shuffle window
  hosts = [data.make_train_iterator(config, BYTES, process_index=i, process_count=2) for i in range(2)]
  for host in hosts:
    _take(host, 6)
  merged = {**hosts[0].get_state(),
            'shards': {**hosts[0].get_state()['shards'], **hosts[1].get_state()['shards']}}
  merged = json.loads(json.dumps(merged))
  per_host = [[batch['inputs'] for batch in _take(host, 3)] for host in hosts]
  expected = [np.concatenate(rows) for rows in zip(*per_host, strict=True)]
  single = data.make_train_iterator(config, BYTES)
  single.set_state(merged)
  for batch, want in zip(_take(single, 3), expected, strict=True):
    np.testing.assert_array_equal(batch['inputs'], want)

  # And a one-process state resumes each of 2 hosts, which keep their own shards of it.
  state = json.loads(json.dumps(single.get_state()))
  expected = _take(single, 2)
  for i in range(2):
    host = data.make_train_iterator(config, BYTES, process_index=i, process_count=2)
    host.set_state(state)
    for batch, want in zip(_take(host, 2), expected, strict=True):
      np.testing.assert_array_equal(batch['inputs'], want['inputs'][i * 4:(i + 1) * 4])


def test_state_of_other_shards_is_refused():
  config = _config(batch_size=8)
  state = data.make_train_iterator(config, BYTES).get_state()
  config.data.num_shards = 2
  with pytest.raises(ValueError, match='num_shards'):
    data.make_train_iterator(config, BYTES).set_state(state)


@pytest.mark.parametrize('shards,processes', [(3, 1), (2, 4), (16, 1)])
def test_shards_must_split_batch_and_processes(shards, processes):
  config = _config(batch_size=8)
  config.data.num_shards = shards
  _raises_one_line(config, 'data.num_shards', lambda config: data.check_shards(config, processes))


def test_default_shards_are_the_batch_power_of_two():
  assert [data.num_shards(_config(batch_size=b)) for b in (1, 6, 8, 48, 256)] == [1, 2, 8, 16, 64]


# ----------------------------------------------------------------------------- JSON lines, Parquet, .bin

def _flat(corpus):
  return [d for element in corpus.documents for d in (element if isinstance(element, list) else [element])]


def _docs(n, rng):
  return [f'document {k}: ' + 'é' * int(rng.integers(0, 3)) + 'x' * int(rng.integers(10, 400))
          for k in range(n)]


@pytest.mark.parametrize('field', ['', 'body'])
def test_jsonl_reads_every_line_once_and_holds_out_the_fraction(tmp_path, field):
  rng = np.random.default_rng(0)
  docs = _docs(900, rng)
  key = field or 'text'
  for k in range(3):
    with open(tmp_path / f'part{k}.jsonl', 'w', encoding='utf-8') as f:
      for d in docs[k * 300:(k + 1) * 300]:
        f.write(json.dumps({key: d, 'id': 7}) + '\n')
  config = _config(source=f'jsonl:{tmp_path}/*.jsonl' + (f':{field}' if field else ''))
  config.data.validation_fraction = 0.1
  train, validation = data.corpus(config, 'train'), data.corpus(config, 'validation')
  assert sorted(_flat(train) + _flat(validation)) == sorted(docs)
  held = sum(len(json.dumps({key: d, 'id': 7})) + 1 for d in _flat(validation))
  total = sum((tmp_path / f'part{k}.jsonl').stat().st_size for k in range(3))
  assert abs(held - 0.1 * total) <= max(len(json.dumps({key: d, 'id': 7})) + 1 for d in docs)
  batch = next(data.make_train_iterator(config, BYTES))
  assert batch['inputs'].shape == (4, 64)
  assert len(data.eval_batches(config, BYTES)) == 3


def test_jsonl_errors_name_the_file_and_line(tmp_path):
  good = json.dumps({'text': 'fine ' * 40})
  (tmp_path / 'a.jsonl').write_text(good + '\n' + '{"text": "cut off\n' + good + '\n')
  message = _raises_one_line(_config(source=f'jsonl:{tmp_path}/a.jsonl:body'), 'a.jsonl:1: no text field')
  assert "'body'" in message and "['text']" in message
  config = _config(source=f'jsonl:{tmp_path}/a.jsonl')
  config.data.validation_fraction = 0
  with pytest.raises(data.files_lib.FormatError, match=r'a.jsonl:2: not JSON') as error:
    _flat(data.corpus(config, 'train'))
  assert '\n' not in str(error.value)
  (tmp_path / 'b.jsonl').write_text('not json\n')
  _raises_one_line(_config(source=f'jsonl:{tmp_path}/b.jsonl'), 'b.jsonl:1: not JSON')


def test_parquet_reads_by_row_group_and_holds_out_the_fraction(tmp_path):
  pa = pytest.importorskip('pyarrow')
  pq = pytest.importorskip('pyarrow.parquet')
  docs = _docs(500, np.random.default_rng(1))
  for k in range(2):
    part = docs[k * 250:(k + 1) * 250]
    pq.write_table(pa.table({'content': part, 'n': list(range(250))}), tmp_path / f'{k}.parquet',
                   row_group_size=40)
  config = _config(source=f'parquet:{tmp_path}/*.parquet:content')
  config.data.validation_fraction = 0.05
  train, validation = data.corpus(config, 'train'), data.corpus(config, 'validation')
  assert sorted(_flat(train) + _flat(validation)) == sorted(docs)
  assert len(_flat(validation)) == 25
  assert max(len(element) for element in train.documents) <= 40  # a row group at a time
  assert next(data.make_train_iterator(config, BYTES))['inputs'].shape == (4, 64)
  _raises_one_line(_config(source=f'parquet:{tmp_path}/*.parquet'), r"no column 'text'")
  _raises_one_line(_config(source=f'parquet:{tmp_path}/*.parquet:n'), r"column 'n' holds int64, not text")
  (tmp_path / 'bad.parquet').write_text('no')
  _raises_one_line(_config(source=f'parquet:{tmp_path}/bad.parquet'), 'not a Parquet file')


def test_bin_shards_are_read_as_windows_exactly(tmp_path):
  rng = np.random.default_rng(2)
  shards = [rng.integers(0, 250, size) for size in (5000, 3000, 777)]
  for k, tokens in enumerate(shards):
    data.files_lib.write_bin(str(tmp_path / f'shard_{k}.bin'), tokens)
  config = _config(source=f'bin:{tmp_path}/*.bin', seq_len=64)
  config.data.validation_fraction = 0.1
  train, validation = data.corpus(config, 'train'), data.corpus(config, 'validation')
  windows = [w for split in (train, validation) for w in split.documents]
  assert all(w.shape == (65,) and w.dtype == np.int32 for w in windows)
  expected = sorted(tuple(t[i * 65:(i + 1) * 65]) for t in shards for i in range(len(t) // 65))
  assert sorted(map(tuple, windows)) == expected
  assert len(validation.documents) == round(0.1 * len(expected))
  batch = next(data.make_train_iterator(config, BYTES))
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert len(data.eval_batches(config, BYTES)) >= 1


def test_bad_bin_shards_are_one_line(tmp_path):
  data.files_lib.write_bin(str(tmp_path / 'big.bin'), np.full(3000, 1000))
  config = _config(source=f'bin:{tmp_path}/big.bin', seq_len=64)
  config.data.validation_fraction = 0.1
  with pytest.raises(data.files_lib.FormatError, match=r'token id 1000, at or above the vocabulary of '
                     r'data.tokenizer \(259\)'):
    next(data.make_train_iterator(config, BYTES))
  data.files_lib.write_bin(str(tmp_path / 'cut.bin'), np.ones(3000))
  with open(tmp_path / 'cut.bin', 'r+b') as f:
    f.truncate(1024 + 2000)
  _raises_one_line(_config(source=f'bin:{tmp_path}/cut.bin'),
                   'counts 3000 tokens but the file holds 1000')
  (tmp_path / 'other.bin').write_bytes(b'\0' * 2048)
  _raises_one_line(_config(source=f'bin:{tmp_path}/other.bin'), 'not a nanoGPT token shard')


# ----------------------------------------------------------------------------- mixtures

def _mixture_config(tmp_path, weights=(0.75, 0.25), batch_size=8):
  """Two sources whose bytes tell them apart: one of 'a's, one of 'b's."""
  for name, letter in (('web', 'a'), ('code', 'b')):
    (tmp_path / name).mkdir(exist_ok=True)
    for k in range(8):
      (tmp_path / name / f'{k}.txt').write_text(letter * 3000)
  config = _config(seq_len=16, batch_size=batch_size)
  config.data.mixture = f'{weights[0]}=text:{tmp_path}/web/*.txt,{weights[1]}=text:{tmp_path}/code/*.txt'
  return config


def test_mixture_draws_by_weight_counts_per_source_and_resumes_exactly(tmp_path):
  config = _mixture_config(tmp_path)
  iterator = data.make_train_iterator(config, BYTES)
  assert iterator.names == ['web', 'code']
  batches = _take(iterator, 50)
  rows = np.concatenate([b['inputs'] for b in batches])
  from_web = np.mean([(row == ord('a')).mean() > 0.5 for row in rows])
  assert from_web == pytest.approx(0.75, abs=0.05)
  drawn = iterator.drawn()
  assert drawn['web'] + drawn['code'] == 50 * 8 * 16
  assert drawn['web'] == pytest.approx(0.75 * 50 * 8 * 16, rel=0.07)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 5)
  restored = data.make_train_iterator(config, BYTES)
  restored.set_state(state)
  assert restored.drawn() == drawn
  _assert_same_batches(_take(restored, 5), expected)
  _assert_same_batches(_take(data.make_train_iterator(config, BYTES), 50), batches)  # deterministic
  sets = data.eval_sets(config, BYTES)
  assert set(sets) == {'web', 'code'} and all(len(batches) >= 1 for batches in sets.values())


@pytest.mark.parametrize('mixture,says', [
    ('0.5=stdlib,abc', "'abc' is not WEIGHT=SOURCE"),
    ('x=stdlib', "'x=stdlib' is not WEIGHT=SOURCE"),
    ('-1=stdlib,2=stdlib', 'is not WEIGHT=SOURCE with a weight >= 0'),
    ('0=stdlib,0=stdlib', 'the weights sum to zero'),
    ('1=text:/nowhere/*.txt', 'no file matches'),
])
def test_bad_mixtures_are_one_line(mixture, says):
  config = _config()
  config.data.mixture = mixture
  _raises_one_line(config, 'data', data.check_source)
  with pytest.raises(ConfigError, match=re.escape(says)):
    data.check_source(config)


# ----------------------------------------------------------------------------- Hugging Face datasets

def test_hf_source_reads_saved_datasets_and_local_files(tmp_path):
  datasets = pytest.importorskip('datasets')
  docs = _docs(300, np.random.default_rng(3))
  rows = datasets.Dataset.from_dict({'content': docs, 'n': list(range(300))})
  datasets.DatasetDict({'train': rows.select(range(250)), 'validation': rows.select(range(250, 300))}
                       ).save_to_disk(str(tmp_path / 'dict'))
  config = _config(source=f'hf:{tmp_path}/dict')
  config.data.tfds_text_key = 'content'
  assert _flat(data.corpus(config, 'train')) == docs[:250]
  assert _flat(data.corpus(config, 'validation')) == docs[250:]  # its own split
  assert next(data.make_train_iterator(config, BYTES))['inputs'].shape == (4, 64)
  rows.save_to_disk(str(tmp_path / 'one'))
  config = _config(source=f'hf:{tmp_path}/one')
  config.data.tfds_text_key, config.data.validation_fraction = 'content', 0.1
  assert _flat(data.corpus(config, 'validation')) == docs[270:]  # no split of its own: the last 10%
  assert _flat(data.corpus(config, 'train')) == docs[:270]
  (tmp_path / 'files').mkdir()
  with open(tmp_path / 'files' / 'a.jsonl', 'w') as f:
    f.writelines(json.dumps({'text': d}) + '\n' for d in docs)
  assert sorted(_flat(data.corpus(_config(source=f'hf:{tmp_path}/files'), 'train'))) == sorted(docs[:294])
  _raises_one_line(_config(source=f'hf:{tmp_path}/one'), "has no text column 'text'")
  _raises_one_line(_config(source='hf:someone/no_such_dataset_xyz'), 'is not a local dataset, and nothing is '
                   'downloaded at run time; set data.hf_download=True')
  (tmp_path / 'junk').mkdir()
  (tmp_path / 'junk' / 'x.bin').write_bytes(b'\0\1')
  _raises_one_line(_config(source=f'hf:{tmp_path}/junk'), 'the datasets library cannot load it')


def test_hf_streaming_reads_in_order_holds_out_every_nth_row_and_resumes_exactly(tmp_path):
  """`data.hf_streaming`: local data files streamed as a Hub dataset would be (what a user with a network
  gets for a corpus larger than the disk), through epochs, on one process or two, resumed mid-stream."""
  pytest.importorskip('datasets')
  docs = _docs(120, np.random.default_rng(5))
  (tmp_path / 'files').mkdir()
  for k in range(3):
    with open(tmp_path / 'files' / f'part{k}.jsonl', 'w') as f:
      f.writelines(json.dumps({'text': d}) + '\n' for d in docs[40 * k:40 * (k + 1)])
  config = _config(source=f'hf:{tmp_path}/files')
  config.data.hf_streaming, config.data.validation_fraction = True, 0.1
  validation = list(data.corpus(config, 'validation').documents)
  assert validation == docs[::10]  # every tenth row, in order
  assert sorted(list(data.corpus(config, 'train').documents)) == sorted(set(docs) - set(docs[::10]))
  assert len(data.eval_batches(config, BYTES)) == 3
  # About 23k train bytes, 4 rows of 65 a batch: 200 batches are two epochs and more (one pass would stop).
  iterator = data.make_train_iterator(config, BYTES)
  batches = _take(iterator, 200)
  rows = [row for b in batches[:20] for row in b['inputs'] if row.max() < 256]
  assert b'document ' in b''.join(row.astype(np.uint8).tobytes() for row in rows)
  _assert_resumes(config, 150, 60)  # across an epoch's end
  _assert_resumes(config, 7, 5)
  halves = [data.make_train_iterator(config, BYTES, process_index=i, process_count=2) for i in range(2)]
  for batch in batches[:10]:
    np.testing.assert_array_equal(np.concatenate([next(h)['inputs'] for h in halves]), batch['inputs'])


# ----------------------------------------------------------------------------- document packing

def _documents_source(tmp_path, lengths):
  """A JSON-lines source of documents of the given byte lengths, each of one repeated letter."""
  path = tmp_path / 'docs.jsonl'
  with open(path, 'w') as f:
    for i, n in enumerate(lengths):
      f.write(json.dumps({'text': chr(ord('a') + i % 26) * n}) + '\n')
  return f'jsonl:{path}'


def _documents_of(batch, row):
  """The (segment id, input ids) runs of one row."""
  seg, inputs = batch['segment_ids'][row], batch['inputs'][row]
  return [(int(s), [int(t) for t in inputs[seg == s]]) for s in np.unique(seg)]


@pytest.mark.parametrize('packing', ['segments', 'first_fit', 'best_fit'])
def test_document_packing_numbers_documents_and_masks_what_crosses_them(tmp_path, packing):
  rng = np.random.default_rng(0)
  config = _config(source=_documents_source(tmp_path, rng.integers(1, 50, 300)), seq_len=64)
  config.data.packing, config.data.validation_fraction, config.data.num_shards = packing, 0.1, 1
  iterator = data.make_train_iterator(config, BYTES)
  for batch in _take(iterator, 5):
    assert set(batch) == {'inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'}
    for row in range(4):
      seg, pos, mask = batch['segment_ids'][row], batch['positions'][row], batch['loss_mask'][row]
      starts = np.flatnonzero(np.diff(seg, prepend=-1))
      assert np.all(np.diff(seg[seg > 0]) >= 0)  # one run each, numbered in order
      for a, b in zip(starts, [*starts[1:], len(seg)], strict=True):
        if seg[a]:
          assert list(pos[a:b]) == list(range(b - a)), (packing, seg, pos)  # positions restart
      inputs, targets = batch['inputs'][row], batch['targets'][row]
      # A document starts with BOS (or continues one cut at the row before, under `segments`), and the
      # loss never counts padding or the step from one document to the next.
      starts_real = [a for a in starts if seg[a]]
      assert all(inputs[a] == BYTES.bos_id for a in starts_real[1:])
      inner = np.arange(63)  # the last input's target is beyond the row's segment ids
      crossing = seg[1:] != seg[:-1]
      assert np.all(mask[seg == 0] == 0)
      assert np.all(mask[inner][crossing] == 0)
      assert np.all(mask[inner][~crossing & (seg[:-1] != 0)] == 1)
      assert np.all(targets[mask == 1] != BYTES.bos_id)
    if packing != 'segments':  # whole documents: each run holds one document, start to end
      for row in range(4):
        for s, text in _documents_of(batch, row):
          if s:
            assert text[0] == BYTES.bos_id and len(set(text[1:-1])) <= 1, text
  _assert_resumes(config, 4, 3)
  assert len(data.eval_batches(config, BYTES)) == 3


@pytest.mark.parametrize('packing', ['segments', 'first_fit', 'best_fit'])
def test_block_attention_gets_documents_on_its_block_grid(tmp_path, packing):
  """NSA (selection blocks of 16 here) needs each document to start on its block grid: the packer pads
  the document before, the padding is its document's but never a target, and nothing else changes."""
  rng = np.random.default_rng(1)
  config = _config(source=_documents_source(tmp_path, rng.integers(1, 50, 300)), seq_len=64)
  config.data.packing, config.data.validation_fraction, config.data.num_shards = packing, 0.1, 1
  config.model.attention, config.model.nsa.sel_block = 'nsa', 16
  assert data.document_alignment(config) == 16
  padded = 0
  for batch in _take(data.make_train_iterator(config, BYTES), 5):
    assert batch['inputs'].shape == (4, 64)
    for row in range(4):
      seg, pos, mask = batch['segment_ids'][row], batch['positions'][row], batch['loss_mask'][row]
      inputs, targets = batch['inputs'][row], batch['targets'][row]
      starts = [a for a in np.flatnonzero(np.diff(seg, prepend=-1)) if seg[a]]
      assert all(a % 16 == 0 and pos[a] == 0 for a in starts), (packing, starts)
      for a in starts[1:]:
        assert inputs[a] == BYTES.bos_id
      for s in np.unique(seg):
        if not s:
          continue
        where = np.flatnonzero(seg == s)
        # A document's tokens (BOS, letters, EOS) come first; what follows its EOS is padding.
        eos = [i for i in where if inputs[i] == BYTES.eos_id]
        if eos:
          after = where[where > eos[0]]
          padded += len(after)
          assert np.all(mask[after] == 0) and np.all(mask[where[where < eos[0]]] == 1)
          assert len(set(int(inputs[i]) for i in where[1:]) - {BYTES.eos_id, 0}) <= 1
      assert np.all(targets[mask == 1] != 0) and np.all(mask[seg == 0] == 0)
  assert padded > 0
  _assert_resumes(config, 4, 3)


def test_fit_packing_truncates_documents_longer_than_the_row_and_counts_them(tmp_path):
  config = _config(source=_documents_source(tmp_path, [10] * 50 + [500] * 3), seq_len=64)
  config.data.packing, config.data.validation_fraction, config.data.num_shards = 'first_fit', 0.1, 1
  before = data.truncated_documents()
  batches = _take(data.make_train_iterator(config, BYTES), 30)
  assert data.truncated_documents() > before
  assert max(int(b['segment_ids'].max()) for b in batches) > 1
  assert all(b['inputs'].shape == (4, 64) for b in batches)


def test_packing_modes_and_sources_without_documents_are_one_line(tmp_path):
  config = _config()
  config.data.packing = 'documents'
  _raises_one_line(config, "data.packing='documents' is not one of concat, segments, first_fit, best_fit")
  path = tmp_path / 'tokens.bin'
  header = np.zeros(256, np.int32)
  header[:3] = (20240520, 1, 4096)
  path.write_bytes(header.tobytes() + np.arange(4096, dtype=np.uint16).tobytes())
  config = _config(source=f'bin:{path}')
  config.data.packing = 'segments'
  _raises_one_line(config, "data.packing='segments' needs document boundaries")


def test_concat_batches_carry_no_segments_and_segments_is_the_default():
  """`concat` batches carry no segments (the model runs one document a row); the default packing keeps
  documents apart."""
  config = _config()
  assert config.data.packing == 'segments'
  assert set(next(data.make_train_iterator(config, BYTES))) == {'inputs', 'targets', 'segment_ids',
                                                                'positions', 'loss_mask'}
  config.data.packing = 'concat'
  assert set(next(data.make_train_iterator(config, BYTES))) == {'inputs', 'targets'}


# ----------------------------------------------------------------------------- shuffling

@pytest.mark.parametrize('size', [41, 40_000])  # a table under _EpochShuffle._TABLE_MAX, grain's above
def test_epoch_shuffle_is_a_new_permutation_every_epoch(size):
  shuffled = data._EpochShuffle(grain.MapDataset.range(size), seed=3)
  epochs = [[shuffled[e * size + i] % size for i in range(size)] for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(size))
  assert epochs[0] != epochs[1] and epochs[0] != list(range(size))
  again = data._EpochShuffle(grain.MapDataset.range(size), seed=3)
  assert [again[i] for i in range(size)] == epochs[0]


def test_state_resumes_exactly_across_shuffle_windows():
  """Saved in the middle of a shuffle window and restored, the stream goes on through the next windows
  (16 windows each here) exactly as it would have."""
  _assert_resumes(_config(), 21, 40)
