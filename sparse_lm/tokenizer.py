"""Tokenizers (`data.tokenizer`): raw UTF-8 bytes (`byte`), a SentencePiece model trained on the train
split (`sentencepiece:VOCAB`) or one the user has (`sentencepiece:PATH.model`), a Hugging Face
`tokenizers` tokenizer (`hf:PATH` to its tokenizer.json: the GPT-2, Llama 3 or Qwen BPE a user already
has), or the bare symbol ids of a synthetic task (`ids:VOCAB`, for MQAR at Zoology's vocabulary of 8192).

A tokenizer from a file is copied into the run's directory when the run starts, and the run reads its
copy from then on (resuming, sampling, evaluating): a file edited or moved later cannot change the ids
of a run, and one that differs from the copy is refused in one line.

All expose the same small interface: `encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`,
and `token_bytes`, the number of bytes of text each id stands for, which turns a loss in nats per token
into bits per byte (`eval_bpb`) so runs with different tokenizers compare.
"""

import io
import itertools
import json
import os
import re
import shutil

import jax
import numpy as np
import sentencepiece as spm
import tokenizers

from sparse_lm import data, distributed
from sparse_lm.errors import ConfigError

# SentencePiece trains on the first this-many characters of the train split: enough to learn a vocabulary of a
# few tens of thousands, and training time stays in seconds.
_SPM_SAMPLE_CHARS = 20 * 2**20
_SPM_MODEL_FILE = 'tokenizer.model'
_HF_FILE = 'tokenizer.json'
_HF_CONFIG_FILE = 'tokenizer_config.json'  # Hugging Face's, beside tokenizer.json: names the EOS token
# End-of-text tokens of the common tokenizers, tried in order when no tokenizer_config.json names one:
# GPT-2, Qwen and OLMo; Llama 3; Llama 2 and Mistral; Gemma.
_KNOWN_EOS = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>')
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


class HuggingFaceTokenizer:
  """A `tokenizers` tokenizer read from its tokenizer.json, with the EOS that `tokenizer_config.json`
  names (when given) or the first of `_KNOWN_EOS` in its vocabulary; documents are encoded without the
  tokenizer's own special tokens, and end in that EOS.

  `token_bytes`: special tokens stand for no text; with a byte-level pre-tokenizer (GPT-2's) every
  character of a token is one byte; otherwise a `<0xNN>` byte-fallback token is one byte and other tokens
  the UTF-8 of their text with `▁` read as a space (SentencePiece-style BPE, Llama 2's).
  """

  def __init__(self, tok: tokenizers.Tokenizer, eos_token: str | None, spec: str):
    self._tok = tok
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    names = [eos_token] if eos_token else list(_KNOWN_EOS)
    eos = next((self._tok.token_to_id(name) for name in names if self._tok.token_to_id(name) is not None),
               None)
    if eos is None:
      raise ConfigError(f'data.tokenizer={spec!r} has no end-of-document token (looked for '
                        f'{", ".join(names)}); training needs one between documents')
    self.eos_id = self.bos_id = self.pad_id = eos
    specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
    byte_level = '"ByteLevel"' in json.dumps(json.loads(tok.to_str()).get('pre_tokenizer'))
    self.token_bytes = np.array([self._piece_bytes(self._tok.id_to_token(i), specials, byte_level)
                                 for i in range(self.vocab_size)], np.int32)
    self._is_special = self.token_bytes == 0

  @staticmethod
  def _piece_bytes(piece: str | None, specials: set[str], byte_level: bool) -> int:
    if piece is None or piece in specials:
      return 0
    if byte_level:
      return len(piece)
    if re.fullmatch(r'<0x[0-9A-Fa-f]{2}>', piece):
      return 1
    return len(piece.replace('\u2581', ' ').encode('utf-8'))

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return self._tok.decode(ids[~self._is_special[ids]].tolist(), skip_special_tokens=False)


def _sample_lines(texts, max_chars: int):
  """Non-empty lines of `texts` up to about `max_chars`: SentencePiece trains on sentences, not files."""
  budget = max_chars
  for line in itertools.chain.from_iterable(text.splitlines() for text in texts):
    if budget <= 0:
      return
    if line:
      budget -= len(line)
      yield line


def _sample_texts(texts, max_chars: int):
  """Whole texts up to about `max_chars` (the last one cut): a BPE learns merges across lines too."""
  budget = max_chars
  for text in texts:
    if budget <= 0:
      return
    budget -= len(text)
    yield text[:budget + len(text)]


def train_sentencepiece(texts, vocab_size: int, model_path: str) -> SentencePieceTokenizer:
  """Trains a BPE model on a bounded sample of `texts` and writes it to `model_path`."""
  model = io.BytesIO()
  try:
    _train_spm(texts, vocab_size, model)
  except RuntimeError as e:
    needed = re.search(r'smaller than required_chars\. \d+ vs (\d+)', str(e))
    if not needed:
      raise
    raise ConfigError(f'data.tokenizer=sentencepiece:{vocab_size}: this corpus needs at least '
                      f'{needed.group(1)} pieces for its characters; raise the vocabulary') from None
  # Written whole under a temporary name, so a reader never sees half a model.
  tmp_path = f'{model_path}.tmp{os.getpid()}'
  with open(tmp_path, 'wb') as f:
    f.write(model.getvalue())
  os.replace(tmp_path, model_path)
  return SentencePieceTokenizer(model.getvalue())


def train_bpe(texts, vocab_size: int, path: str) -> 'HuggingFaceTokenizer':
  """Trains a byte-level BPE (GPT-2's scheme: every byte is in the alphabet, so nothing is unknown) with
  the `tokenizers` trainer on a sample as large as SentencePiece's (whole texts), with `<|endoftext|>` as its
  end-of-document token, and writes its tokenizer.json to `path` (whole, under a temporary name first)."""
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size <= len(alphabet) + 1:
    raise ConfigError(f'bpe:{vocab_size}: VOCAB must be above {len(alphabet) + 1} (the 256 byte symbols '
                      'and the end-of-document token come first)')
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[_KNOWN_EOS[0]],
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(_sample_texts(texts, _SPM_SAMPLE_CHARS), trainer)
  tmp_path = f'{path}.tmp{os.getpid()}'
  tok.save(tmp_path)
  os.replace(tmp_path, path)
  return HuggingFaceTokenizer(tok, _KNOWN_EOS[0], f'hf:{path}')


def _train_spm(texts, vocab_size: int, model: io.BytesIO) -> None:
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
  if _is_file_spec(spec):
    return _from_file(spec, given_file(spec)).vocab_size
  if not spec.startswith('sentencepiece:'):
    raise ConfigError(f"data.tokenizer={spec!r} is not one of 'byte', 'sentencepiece:VOCAB', "
                      "'sentencepiece:PATH.model', 'hf:PATH' (a tokenizer.json), 'ids:VOCAB'")
  return _spm_vocab_size(spec)


def given_file(spec: str) -> str:
  """The file a `sentencepiece:PATH.model` or `hf:PATH` spec names (hf: a directory holding
  tokenizer.json will do), or a ConfigError."""
  kind, _, path = spec.partition(':')
  path = os.path.expanduser(path)
  if kind == 'hf' and os.path.isdir(path):
    path = os.path.join(path, _HF_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f'data.tokenizer={spec!r}: no such file {path!r}')
  return path


def _from_file(spec: str, path: str):
  """The tokenizer in `path` (a tokenizer.json for hf:, a SentencePiece model otherwise), or one line
  saying it is not one."""
  with open(path, 'rb') as f:
    content = f.read()
  kind = 'tokenizers tokenizer.json' if spec.startswith('hf:') else 'SentencePiece model'
  try:
    if spec.startswith('hf:'):
      tok = tokenizers.Tokenizer.from_str(content.decode('utf-8'))
    else:
      tokenizer = SentencePieceTokenizer(content)
  # The tokenizers library raises a plain Exception for a file it cannot parse; SentencePiece a
  # RuntimeError.
  except Exception as e:  # noqa: BLE001
    first = (str(e).strip().splitlines() or [''])[0]
    raise ConfigError(f'data.tokenizer={spec!r}: {path} is not a {kind} ({type(e).__name__}: '
                      f'{first[:200]})') from None
  if spec.startswith('hf:'):
    return HuggingFaceTokenizer(tok, _eos_token(os.path.join(os.path.dirname(path), _HF_CONFIG_FILE)), spec)
  if tokenizer.eos_id < 0:
    raise ConfigError(f'data.tokenizer={spec!r}: {path} has no end-of-document token (eos_id is -1); '
                      'training needs one between documents')
  return tokenizer


def _eos_token(config_path: str) -> str | None:
  """The `eos_token` a Hugging Face tokenizer_config.json names (a string or {"content": ...})."""
  if not os.path.isfile(config_path):
    return None
  with open(config_path, encoding='utf-8') as f:
    eos = json.load(f).get('eos_token')
  return eos.get('content') if isinstance(eos, dict) else eos


def _id_symbols(config) -> int:
  """The VOCAB of 'ids:VOCAB', for the synthetic sources whose documents are ids; else a ConfigError."""
  spec, source = config.data.tokenizer, config.data.source
  vocab = spec.removeprefix('ids:')
  if not vocab.isdigit() or int(vocab) < 4 or not source.startswith('mqar'):
    raise ConfigError(f'data.tokenizer={spec!r}: ids:VOCAB (VOCAB >= 4 symbols) serves data.source=mqar '
                      f'only, got data.source={source!r}')
  return int(vocab)


def _is_file_spec(spec: str) -> bool:
  return spec.startswith('hf:') or (spec.startswith('sentencepiece:') and
                                    not spec.removeprefix('sentencepiece:').isdigit())


def make_tokenizer(config, workdir: str):
  """The tokenizer `data.tokenizer` names; a SentencePiece model is trained once and kept in `workdir`,
  a tokenizer file copied there."""
  if _is_file_spec(config.data.tokenizer):
    return _run_copy(config.data.tokenizer, workdir)
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


def copy_name(spec: str) -> str:
  """The name of the run's copy of the file a tokenizer spec names."""
  return _HF_FILE if spec.startswith('hf:') else _SPM_MODEL_FILE


def _run_copy(spec: str, workdir: str):
  """The run's copy of the tokenizer file `spec` names: made when the run starts; afterwards the given
  file, where it still exists, must be the same. Each host reads its own (hosts may not share a disk)."""
  given = os.path.expanduser(spec.partition(':')[2])
  names = [_HF_FILE, _HF_CONFIG_FILE] if spec.startswith('hf:') else [_SPM_MODEL_FILE]
  copy = os.path.join(workdir, names[0])
  if os.path.exists(copy):
    if os.path.exists(given):
      with open(given_file(spec), 'rb') as a, open(copy, 'rb') as b:
        if a.read() != b.read():
          raise ConfigError(f'data.tokenizer={spec!r} differs from the copy this run started with '
                            f'({copy}); use a new --workdir for another tokenizer')
    return _from_file(spec.partition(':')[0] + ':' + copy, copy)
  path = given_file(spec)
  tokenizer = _from_file(spec, path)
  os.makedirs(workdir, exist_ok=True)
  for name, source in zip(names, (path, os.path.join(os.path.dirname(path), _HF_CONFIG_FILE)), strict=False):
    if os.path.isfile(source):
      shutil.copyfile(source, f'{os.path.join(workdir, name)}.tmp')
      os.replace(f'{os.path.join(workdir, name)}.tmp', os.path.join(workdir, name))
  return tokenizer


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
