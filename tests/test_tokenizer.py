import os

import numpy as np
import pytest

from sparse_lm import config as config_lib
from sparse_lm import tokenizer as tokenizer_lib
from sparse_lm.config import ConfigError

SHAKESPEARE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'tinyshakespeare.txt')
TEXT = ' Hello,\n\n  wörld\t 日本語 — done. '


def _config(tokenizer='byte'):
  config = config_lib.base_config()
  config.data.source = f'text:{SHAKESPEARE}'
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
  with open(SHAKESPEARE, encoding='utf-8') as f:
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
  assert len(tok.encode(texts[0][:5000])) < 5000 * 0.7  # it learned merges


def test_make_tokenizer_trains_once_and_reuses(tmp_path):
  config = _config('sentencepiece:320')
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
