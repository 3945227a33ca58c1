import os

import numpy as np
import pytest

from sparse_lm import config as config_lib
from sparse_lm import tokenizer as tokenizer_lib
from sparse_lm.config import ConfigError
from tests.conftest import CORPUS_FILE, write_bpe

TEXT = ' Hello,\n\n  wörld\t 日本語 — done. '


def _config(tokenizer='byte'):
  config = config_lib.base_config()
  config.data.source = f'text:{CORPUS_FILE}'
  config.data.tokenizer = tokenizer
  return config


def test_byte_round_trip_and_token_bytes():
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32
  assert tok.decode(ids) == TEXT
  assert tok.token_bytes.shape == (tok.vocab_size,)
  assert tok.token_bytes[ids].sum() == len(TEXT.encode('utf-8'))
  assert tok.token_bytes[[tok.bos_id, tok.eos_id, tok.pad_id]].tolist() == [0, 0, 0]


def test_byte_decode_drops_specials_and_replaces_invalid_utf8():
  tok = tokenizer_lib.ByteTokenizer()
  assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]) == 'hi'
  assert tok.decode([104, 0xFF, 105]) == 'h\ufffdi'


def test_sentencepiece_trains_and_round_trips(tmp_path):
  with open(CORPUS_FILE, encoding='utf-8') as f:
    texts = [f.read(100_000)]
  model_path = str(tmp_path / 'spm.model')
  tok = tokenizer_lib.train_sentencepiece(texts, 384, model_path)
  assert os.path.exists(model_path)
  assert tok.vocab_size == 384
  ids = tok.encode(TEXT)  # characters never seen in training go through byte fallback
  assert ids.dtype == np.int32
  assert tok.decode(ids) == TEXT
  assert tok.token_bytes[ids].sum() == len(TEXT.encode('utf-8'))
  assert tok.token_bytes[[tok.bos_id, tok.eos_id, tok.pad_id]].tolist() == [0, 0, 0]
  assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == TEXT
  assert len(tok.encode(texts[0][:5000])) < 5000 * 0.9  # it learned merges (bytes alone: 5000)


def test_make_tokenizer_trains_once_and_reuses(tmp_path):
  config = _config('sentencepiece:512')
  tok = tokenizer_lib.make_tokenizer(config, str(tmp_path))
  model_path = tmp_path / 'tokenizer.model'
  assert model_path.exists()
  stamp = model_path.stat().st_mtime_ns
  again = tokenizer_lib.make_tokenizer(config, str(tmp_path))
  assert model_path.stat().st_mtime_ns == stamp
  np.testing.assert_array_equal(again.encode(TEXT), tok.encode(TEXT))
  with pytest.raises(ConfigError, match='data.tokenizer'):
    tokenizer_lib.make_tokenizer(_config('sentencepiece:400'), str(tmp_path))


def test_make_tokenizer_byte(tmp_path):
  assert isinstance(tokenizer_lib.make_tokenizer(_config(), str(tmp_path)), tokenizer_lib.ByteTokenizer)


@pytest.mark.parametrize('spec', ['bpe', 'sentencepiece', 'sentencepiece:abc', 'sentencepiece:100'])
def test_bad_tokenizer_is_one_line_config_error(tmp_path, spec):
  with pytest.raises(ConfigError, match='data.tokenizer') as error:
    tokenizer_lib.make_tokenizer(_config(spec), str(tmp_path))
  assert '\n' not in str(error.value)


# ----------------------------------------------------------------------------- a tokenizer the user has

def test_hf_tokenizer_json_round_trips_with_its_eos_and_exact_bytes(tmp_path):
  """A GPT-2-style byte-level BPE trained here: EOS is its <|endoftext|>, documents encode without it,
  every id's bytes add up to the text's (byte-level pieces are bytes), and decoding drops the EOS."""
  path = write_bpe(tmp_path / 'bpe')
  config = _config(f'hf:{path}')
  tok = tokenizer_lib.make_tokenizer(config, str(tmp_path / 'run'))
  assert tok.vocab_size == tokenizer_lib.vocab_size_for(config) == 400
  assert tok.eos_id == tok._tok.token_to_id('<|endoftext|>')
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32 and tok.eos_id not in ids
  assert tok.decode(ids) == TEXT and tok.decode([*ids, tok.eos_id]) == TEXT
  assert tok.token_bytes[ids].sum() == len(TEXT.encode('utf-8'))
  assert tok.token_bytes[tok.eos_id] == 0
  assert len(tok.encode(CORPUS_FILE.read_text()[:5000])) < 5000 * 0.9  # it learned merges
  assert (tmp_path / 'run' / 'tokenizer.json').read_bytes() == path.read_bytes()  # the run's copy


def test_hf_tokenizer_takes_eos_from_tokenizer_config(tmp_path):
  path = write_bpe(tmp_path, eos='<|im_end|>')
  (tmp_path / 'tokenizer_config.json').write_text('{"eos_token": {"content": "<|im_end|>"}}')
  tok = tokenizer_lib.make_tokenizer(_config(f'hf:{tmp_path}'), str(tmp_path / 'run'))
  assert tok.eos_id == tok._tok.token_to_id('<|im_end|>')
  assert (tmp_path / 'run' / 'tokenizer_config.json').exists()
  del path


def test_sentencepiece_model_file_is_used_as_given(tmp_path):
  texts = [CORPUS_FILE.read_text(encoding='utf-8')[:100_000]]
  tokenizer_lib.train_sentencepiece(texts, 512, str(tmp_path / 'mine.model'))
  config = _config(f'sentencepiece:{tmp_path}/mine.model')
  tok = tokenizer_lib.make_tokenizer(config, str(tmp_path / 'run'))
  assert tok.vocab_size == tokenizer_lib.vocab_size_for(config) == 512 and tok.eos_id == 2
  assert tok.decode(tok.encode(TEXT)) == TEXT
  assert (tmp_path / 'run' / 'tokenizer.model').read_bytes() == (tmp_path / 'mine.model').read_bytes()


def test_a_run_keeps_its_copy_of_the_tokenizer(tmp_path):
  """Once a run has started, its copy decides the ids: the given file may go away (sampling and
  evaluating still work), but a different file under the same name is refused."""
  path = write_bpe(tmp_path / 'bpe')
  config = _config(f'hf:{path}')
  ids = tokenizer_lib.make_tokenizer(config, str(tmp_path / 'run')).encode(TEXT)
  path.unlink()
  np.testing.assert_array_equal(tokenizer_lib.make_tokenizer(config, str(tmp_path / 'run')).encode(TEXT), ids)
  write_bpe(tmp_path / 'bpe', vocab_size=350)
  with pytest.raises(ConfigError, match='differs from the copy this run started with') as error:
    tokenizer_lib.make_tokenizer(config, str(tmp_path / 'run'))
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('case', ['missing', 'not a tokenizer', 'no eos', 'not a model'])
def test_bad_tokenizer_files_are_one_line(tmp_path, case):
  if case == 'missing':
    spec, says = f'hf:{tmp_path}/nope.json', 'no such file'
  elif case == 'not a tokenizer':
    (tmp_path / 'tokenizer.json').write_text('{"hello": 1}')
    spec, says = f'hf:{tmp_path}/tokenizer.json', 'is not a tokenizers tokenizer.json'
  elif case == 'no eos':
    write_bpe(tmp_path, eos=None, byte_level=False)
    spec, says = f'hf:{tmp_path}/tokenizer.json', 'has no end-of-document token'
  else:
    (tmp_path / 'x.model').write_bytes(b'not a model')
    spec, says = f'sentencepiece:{tmp_path}/x.model', 'is not a SentencePiece model'
  for call in (tokenizer_lib.vocab_size_for, lambda c: tokenizer_lib.make_tokenizer(c, str(tmp_path / 'r'))):
    with pytest.raises(ConfigError, match=says) as error:
      call(_config(spec))
    assert '\n' not in str(error.value) and str(error.value).startswith(f'data.tokenizer={spec!r}')


def test_sentencepiece_vocabulary_too_small_for_the_corpus_is_one_line(tmp_path):
  with pytest.raises(ConfigError, match=r'this corpus needs at least \d+ pieces for its characters') as error:
    tokenizer_lib.make_tokenizer(_config('sentencepiece:300'), str(tmp_path))
  assert '\n' not in str(error.value)
