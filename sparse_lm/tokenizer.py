"""Tokenizers: raw UTF-8 bytes, a SentencePiece model trained on the train split, or the bare symbol ids
of a synthetic task (`ids:VOCAB`, for MQAR at Zoology's vocabulary of 8192).

All expose the same small interface: `encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`,
and `token_bytes`, the number of bytes of text each id stands for, which turns a loss in nats per token
into bits per byte (`eval_bpb`) so runs with different tokenizers compare.
"""

import io
import itertools
import os

import jax
import numpy as np
import sentencepiece as spm

from sparse_lm import data, distributed
from sparse_lm.errors import ConfigError

# SentencePiece trains on the first this-many characters of the train split: enough to learn a vocabulary of a
# few tens of thousands, and training time stays in seconds.
_SPM_SAMPLE_CHARS = 20 * 2**20
_SPM_MODEL_FILE = 'tokenizer.model'
# unk, bos, eos, pad; the 256 byte-fallback pieces come after them.
_SPM_NUM_SPECIALS = 4


class ByteTokenizer:
  """Ids 0..255 are UTF-8 bytes; BOS, EOS and PAD follow."""

  bos_id = 256
  eos_id = 257
  pad_id = 258
  vocab_size = 259

  def __init__(self):
    self.token_bytes = np.zeros(self.vocab_size, np.int32)
    self.token_bytes[:256] = 1

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return ids[ids < 256].astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class IdTokenizer:
  """Ids 0..V-1 are the symbols of a synthetic task that has no text (MQAR); BOS, EOS and PAD follow.
  Text is space-separated ids, so prompts and samples stay readable; a symbol counts as one byte, so
  bits per byte are bits per symbol."""

  def __init__(self, num_symbols: int):
    self.bos_id, self.eos_id, self.pad_id = num_symbols, num_symbols + 1, num_symbols + 2
    self.vocab_size = num_symbols + 3
    self.token_bytes = np.zeros(self.vocab_size, np.int32)
    self.token_bytes[:num_symbols] = 1

  def encode(self, text: str) -> np.ndarray:
    ids = np.asarray([int(word) for word in text.split()], np.int32)
    if np.any((ids < 0) | (ids >= self.bos_id)):
      raise ValueError(f'ids tokenizer: symbols are 0..{self.bos_id - 1}, got {text!r}')
    return ids

  def decode(self, ids) -> str:
    return ' '.join(str(int(i)) for i in np.asarray(ids) if i < self.bos_id)


class SentencePieceTokenizer:
  """A SentencePiece model trained by `train_sentencepiece` (byte fallback, no normalisation)."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.vocab_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id()
    self.token_bytes = np.array([self._piece_bytes(i) for i in range(self.vocab_size)], np.int32)
    self._is_special = self.token_bytes == 0

  @classmethod
  def load(cls, model_path: str) -> 'SentencePieceTokenizer':
    with open(model_path, 'rb') as f:
      return cls(f.read())

  def _piece_bytes(self, i: int) -> int:
    if self._sp.is_control(i) or self._sp.is_unknown(i):
      return 0
    if self._sp.is_byte(i):  # '<0xNN>' stands for one byte
      return 1
    return len(self._sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return self._sp.decode(ids[~self._is_special[ids]].tolist())


def _sample_lines(texts, max_chars: int):
  """Non-empty lines of `texts` up to about `max_chars`: SentencePiece trains on sentences, not files."""
  budget = max_chars
  for line in itertools.chain.from_iterable(text.splitlines() for text in texts):
    if budget <= 0:
      return
    if line:
      budget -= len(line)
      yield line


def train_sentencepiece(texts, vocab_size: int, model_path: str) -> SentencePieceTokenizer:
  """Trains a BPE model on a bounded sample of `texts` and writes it to `model_path`."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_sample_lines(texts, _SPM_SAMPLE_CHARS),
      model_writer=model,
      vocab_size=vocab_size,
      model_type='bpe',
      # Every string is representable, so no <unk> ever reaches the model.
      byte_fallback=True,
      # Code and prose are modelled exactly as written: decode(encode(text)) == text, and bits per byte
      # count the bytes of the real text.
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      unk_id=0, bos_id=1, eos_id=2, pad_id=3,
      minloglevel=2,
  )
  # Written whole under a temporary name, so a reader never sees half a model.
  tmp_path = f'{model_path}.tmp{os.getpid()}'
  with open(tmp_path, 'wb') as f:
    f.write(model.getvalue())
  os.replace(tmp_path, model_path)
  return SentencePieceTokenizer(model.getvalue())


def _spm_vocab_size(spec: str) -> int:
  """The VOCAB of 'sentencepiece:VOCAB', or a ConfigError."""
  vocab = spec.removeprefix('sentencepiece:')
  if not vocab.isdigit() or int(vocab) <= 256 + _SPM_NUM_SPECIALS:
    raise ConfigError(
        f"data.tokenizer={spec!r}: VOCAB must be an integer above {256 + _SPM_NUM_SPECIALS} "
        '(256 byte pieces and 4 specials come first)')
  return int(vocab)


def vocab_size_for(config) -> int:
  """The vocabulary `data.tokenizer` gives, known without building (or training) the tokenizer."""
  spec = config.data.tokenizer
  if spec == 'byte':
    return ByteTokenizer.vocab_size
  if spec.startswith('ids:'):
    return _id_symbols(config) + 3
  if not spec.startswith('sentencepiece:'):
    raise ConfigError(f"data.tokenizer={spec!r} is not one of 'byte', 'sentencepiece:VOCAB', 'ids:VOCAB'")
  return _spm_vocab_size(spec)


def _id_symbols(config) -> int:
  """The VOCAB of 'ids:VOCAB', for the synthetic sources whose documents are ids; else a ConfigError."""
  spec, source = config.data.tokenizer, config.data.source
  vocab = spec.removeprefix('ids:')
  if not vocab.isdigit() or int(vocab) < 4 or not source.startswith('mqar'):
    raise ConfigError(f'data.tokenizer={spec!r}: ids:VOCAB (VOCAB >= 4 symbols) serves data.source=mqar '
                      f'only, got data.source={source!r}')
  return int(vocab)


def make_tokenizer(config, workdir: str):
  """The tokenizer `data.tokenizer` names; a SentencePiece model is trained once and kept in `workdir`."""
  vocab_size = vocab_size_for(config)
  if config.data.tokenizer == 'byte':
    return ByteTokenizer()
  if config.data.tokenizer.startswith('ids:'):
    return IdTokenizer(vocab_size - 3)
  if jax.process_count() > 1:
    # Trained (or loaded) once, by process 0, and sent to the others: hosts may not share a disk,
    # and independent trainings need not agree.
    proto = _spm_model(config, workdir, vocab_size).model_proto if jax.process_index() == 0 else None
    return SentencePieceTokenizer(distributed.broadcast_bytes(proto))
  return _spm_model(config, workdir, vocab_size)


def _spm_model(config, workdir: str, vocab_size: int) -> 'SentencePieceTokenizer':
  spec = config.data.tokenizer
  # Reusing the saved model keeps ids stable across resumes, evaluation and sampling.
  model_path = os.path.join(workdir, _SPM_MODEL_FILE)
  if os.path.exists(model_path):
    tokenizer = SentencePieceTokenizer.load(model_path)
    if tokenizer.vocab_size != vocab_size:
      raise ConfigError(
          f'data.tokenizer={spec!r} but {model_path} has vocab {tokenizer.vocab_size}; '
          'use a new workdir to train another')
    return tokenizer
  os.makedirs(workdir, exist_ok=True)
  return train_sentencepiece(data.train_documents(config), vocab_size, model_path)
