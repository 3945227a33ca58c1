"""Documents -> tokens -> packed fixed-length windows -> batches, with grain.

A source (`data.source`) gives each split as a `Corpus`: documents read lazily on access (text, a list
of texts for a piece of a JSON-lines or Parquet file, token ids for `tokens:` shards and synthetic tasks,
or whole windows for `bin:` shards), and their size in UTF-8 bytes where that is cheap to know. A new
source is one function plus one `SOURCES` line. File formats are read by `files.py`. Every split is
held out by `data.validation_fraction` of the source's units (`_split_spans`), except where the source
has its own (TFDS, Hugging Face datasets, prepared shards).

Training: the train documents are dealt into `data.num_shards` virtual shards (`documents[j::S]`), and
each shard is its own stream: its documents shuffled by `train.seed` with a new order every epoch,
repeated forever, tokenized with EOS after each document, concatenated and split into windows of
`seq_len + 1` tokens, shuffled within a window of `data.shuffle_buffer`. A global batch of B sequences
takes B / S consecutive windows from each shard, shard-major. The shards, not the hosts, fix the data:
a host runs only the shards it owns (S / process_count of them, contiguous) and yields its rows of the
global batch, so 1 process or 16 see the same global batches, and a checkpoint (the states of all S
shard streams, gathered from every host) resumes on any process count that divides S. Each batch is
`{'inputs', 'targets'}`, both `int32[b, T]`, the targets being the inputs shifted by one.

A mixture (`data.mixture`) runs one such stream per source inside each shard and draws windows from them
by weight (grain's mix), counting the tokens drawn from each.

Evaluation reads the validation split in order, once, and never shuffles.
"""

import codecs
import collections
import copy
import dataclasses
import functools
import glob
import itertools
import json
import os
import pathlib
import re
import sysconfig
import zlib

import grain
import numpy as np
from absl import logging

from sparse_lm import distributed, synthetic
from sparse_lm import files as files_lib
from sparse_lm.errors import ConfigError

# Long text files are cut into documents of this many bytes so that a corpus of one big file still has
# something to shuffle. The EOS that ends each piece is right, not an artefact: after shuffling, the
# text that follows a piece is not its continuation.
_TEXT_PIECE_BYTES = 64 * 1024
_UTF8_MAX_CONTINUATION = 3
# `data.packing`: how documents become rows (`_pack`).
PACKINGS = ('concat', 'segments', 'first_fit', 'best_fit')


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One split of a source."""

  documents: grain.MapDataset  # of str (or a list of them, or token ids), read on access
  num_bytes: int | None  # UTF-8 bytes of all documents; None where only reading everything would tell
  windows: bool = False  # the elements are already windows of seq_len + 1 token ids (pre-tokenized)
  # Each document and its EOS are exactly one row (the synthetic tasks): under document packing a row is
  # then one segment, the example, as `concat` cuts it.
  whole_rows: bool = False
  # Shuffled documents read and packed this many at a time (one batched read, one element of the packer):
  # short pre-tokenized documents would otherwise cost more in grain's per-element work than in reading.
  block: int = 1
  # A streamed source (no random access, no length): `documents` is then a grain.IterDataset read once in
  # order, and `stream(j, S)` the endless stream of train shard j of S, its state resumable.
  stream: object = None


@dataclasses.dataclass(frozen=True)
class TextFile:
  """A file, or a part of one (a Parquet row group), as the split sees it."""

  name: str  # relative to the corpus root: what orders the split, the same on every host and directory
  path: str | tuple  # what its reader opens
  size: int  # in the split's unit: bytes (text, JSON lines), rows (Parquet) or windows (token shards)


def _validation_order(files: list[TextFile]) -> list[TextFile]:
  """A stable hash of each name, so the split is the same on every host, run and Python version."""
  return sorted(files, key=lambda f: (zlib.crc32(f.name.encode('utf-8')), f.name))


def _split_spans(files: list[TextFile], fraction: float, split: str) -> list[tuple]:
  """The split's spans `(path, start, stop)` of the files, in their units.

  Validation holds `fraction` of all units (bytes: to the byte, within a character or a line; rows;
  windows): whole files in hash order while they fit, then the tail of the file that crosses the target.
  So one big file, many small ones and any mix hold out what `data.validation_fraction` says, and the
  rest is train.
  """
  target = round(fraction * sum(f.size for f in files))
  spans, taken = [], 0
  for f in _validation_order(files):
    held = min(f.size, target - taken)
    taken += held
    start, stop = (0, f.size - held) if split == 'train' else (f.size - held, f.size)
    spans += [(f.path, start, stop)] if stop > start else []
  return sorted(spans)  # in file order; the shuffle, not this order, decides the batches


def _split_pieces(files: list[TextFile], fraction: float, split: str) -> list[tuple]:
  """The split's spans cut into pieces of at most `_TEXT_PIECE_BYTES`."""
  return [(path, s, min(s + _TEXT_PIECE_BYTES, stop))
          for path, start, stop in _split_spans(files, fraction, split)
          for s in range(start, stop, _TEXT_PIECE_BYTES)]


@functools.cache
def _stdlib_files() -> tuple[TextFile, ...]:
  """The standard library's .py files, sorted by their path relative to it."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ('site-packages', 'dist-packages')]
    for name in filenames:
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        files.append(TextFile(os.path.relpath(path, root).replace(os.sep, '/'), path, os.path.getsize(path)))
  return tuple(sorted(files, key=lambda f: f.name))


def _pieces_corpus(files, config, split: str) -> Corpus:
  pieces = _split_pieces(list(files), config.data.validation_fraction, split)
  return Corpus(grain.MapDataset.source(pieces).map(_read_piece),
                num_bytes=sum(stop - start for _, start, stop in pieces))


def _stdlib_source(arg: str, config, split: str) -> Corpus:
  """The running interpreter's standard library, cut into pieces like any text file. Its few files
  that are not UTF-8 (tests of the tokenizer's encoding errors) are read with replacement characters."""
  if arg:
    raise ConfigError(f"data.source='stdlib:{arg}': stdlib takes no argument")
  return _pieces_corpus(_stdlib_files(), config, split)


def _continuation_run(data: bytes, start: int) -> int:
  """How many bytes from `start` are UTF-8 continuation bytes (10xxxxxx)."""
  run = 0
  while run < _UTF8_MAX_CONTINUATION and start + run < len(data) and data[start + run] & 0xC0 == 0x80:
    run += 1
  return run


def _read_piece(piece: tuple[str, int, int]) -> str:
  """Bytes [start, stop) of a file, moved so that each character is in the piece holding its first byte."""
  path, start, stop = piece
  with open(path, 'rb') as f:
    f.seek(start)
    data = f.read(stop - start + _UTF8_MAX_CONTINUATION)
  end = stop - start
  return data[_continuation_run(data, 0):end + _continuation_run(data, end)].decode(
      'utf-8', errors='replace')


# What `text:` refuses by name: formats whose bytes are not the text to train on, each with what it is
# and the source that reads it. Any other file is read if its first piece is UTF-8 without NUL bytes.
_NOT_TEXT = {
    '.jsonl': ('JSON lines', 'jsonl:GLOB[:FIELD] reads their text field'),
    '.json': ('JSON', 'jsonl:GLOB[:FIELD] reads JSON lines'),
    '.parquet': ('a Parquet table', 'parquet:GLOB[:COLUMN] reads its text column'),
    '.bin': ('binary', 'bin:GLOB reads nanoGPT token shards'),
    '.arrayrecord': ('ArrayRecord records', 'no source reads them yet'),
    '.array_record': ('ArrayRecord records', 'no source reads them yet'),
    '.npy': ('a NumPy array', 'no source reads it'), '.npz': ('NumPy arrays', 'no source reads them'),
    '.tfrecord': ('TFRecord records', 'tfds:NAME reads prepared TFDS datasets'),
    **{ext: ('compressed', 'decompress it first') for ext in ('.gz', '.zst', '.zip', '.bz2', '.xz')},
    '.pt': ('a PyTorch file', 'no source reads it'), '.safetensors': ('tensors', 'no source reads them'),
}


def _check_text(path: str, source: str) -> None:
  """ConfigError unless `path` looks like UTF-8 text: its name, then its first piece."""
  kind, other = next((found for ext, found in _NOT_TEXT.items() if path.lower().endswith(ext)), (None, ''))
  if kind is None:
    with open(path, 'rb') as f:
      head = f.read(_TEXT_PIECE_BYTES)
    try:
      codecs.getincrementaldecoder('utf-8')().decode(head, final=False)  # a cut last character is fine
      kind = 'binary (it holds NUL bytes)' if b'\0' in head else None
    except UnicodeDecodeError as e:
      kind = f'not UTF-8 text (byte {e.start} is not)'
  if kind is not None:
    raise ConfigError(f'data.source={source!r}: {path} is {kind}; text: reads UTF-8 text files only'
                      f'{" (" + other + ")" if other else ""}')


def _glob_root(pattern: str) -> str:
  """The directory a glob's matches are named relative to: its longest prefix without wildcards."""
  parts = pathlib.PurePath(pattern).parts
  fixed = list(itertools.takewhile(lambda p: not glob.has_magic(p), parts))
  return str(pathlib.PurePath(*fixed).parent if len(fixed) == len(parts) else pathlib.PurePath(*fixed))


@functools.cache
def _glob_files(pattern: str, source: str) -> tuple[TextFile, ...]:
  """The files `pattern` matches, sorted, named relative to its root, with their sizes in bytes."""
  pattern = os.path.expanduser(pattern)
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise ConfigError(f'data.source={source!r}: no file matches {pattern!r}')
  root = _glob_root(pattern)
  return tuple(TextFile(os.path.relpath(p, root), p, os.path.getsize(p)) for p in paths)


@functools.cache
def _text_files(pattern: str, source: str) -> tuple[TextFile, ...]:
  files = _glob_files(pattern, source)
  for f in files:
    _check_text(f.path, source)
  return files


def _text_source(pattern: str, config, split: str) -> Corpus:
  """Local UTF-8 text files, cut into pieces; `data.validation_fraction` of their bytes is validation."""
  return _pieces_corpus(_text_files(pattern, config.data.source), config, split)


def _glob_and_key(arg: str, default: str) -> tuple[str, str]:
  """'GLOB[:KEY]' as (GLOB, KEY): a last ':' part that looks like a name (no '/', '*' or '.') is a key."""
  pattern, sep, key = arg.rpartition(':')
  if not sep or not key or any(c in key for c in '/*.?['):
    return arg, default
  return pattern, key


@functools.cache
def _jsonl_files(pattern: str, field: str, source: str) -> tuple[TextFile, ...]:
  files = _glob_files(pattern, source)
  for f in files:  # the first line of each, so a wrong field or a file that is not JSON fails at once
    files_lib.jsonl_documents(f.path, 0, 1, field)
  return files


def _jsonl_source(arg: str, config, split: str) -> Corpus:
  """JSON lines, one document a line with its text in FIELD (default `text`), read in pieces of lines;
  `data.validation_fraction` of the bytes (whole lines) is validation."""
  pattern, field = _glob_and_key(arg, 'text')
  pieces = _split_pieces(list(_jsonl_files(pattern, field, config.data.source)),
                         config.data.validation_fraction, split)
  return Corpus(grain.MapDataset.source(pieces).map(lambda p: files_lib.jsonl_documents(*p, field)),
                num_bytes=sum(stop - start for _, start, stop in pieces))


@functools.cache
def _parquet_groups(pattern: str, column: str, source: str) -> tuple[TextFile, ...]:
  """Every row group of the matched files, as a part of the split counted in rows."""
  return tuple(TextFile(f'{f.name}#{g}', (f.path, g), rows)
               for f in _glob_files(pattern, source)
               for g, rows in enumerate(files_lib.parquet_row_groups(f.path, column)))


def _parquet_source(arg: str, config, split: str) -> Corpus:
  """Parquet files, one document a row with its text in COLUMN (default `text`), read a row group at a
  time; `data.validation_fraction` of the rows is validation."""
  pattern, column = _glob_and_key(arg, 'text')
  spans = _split_spans(list(_parquet_groups(pattern, column, config.data.source)),
                       config.data.validation_fraction, split)
  return Corpus(grain.MapDataset.source(spans).map(
      lambda span: files_lib.parquet_documents(*span[0], span[1], span[2], column)), num_bytes=None)


class _Windows:
  """Random access to windows of `length` tokens in spans of nanoGPT token shards, `(path, first
  window, stop window)` each; the shards are memory-mapped on first use, in each reading process."""

  def __init__(self, spans: list[tuple], length: int):
    self._spans, self._length = spans, length
    self._ends = np.cumsum([stop - start for _, start, stop in spans])
    self._maps = {}

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> np.ndarray:
    span = int(np.searchsorted(self._ends, index, side='right'))
    path, start, _ = self._spans[span]
    window = start + index - (int(self._ends[span - 1]) if span else 0)
    if path not in self._maps:
      self._maps[path] = files_lib.bin_tokens(path)
    return np.asarray(self._maps[path][window * self._length:(window + 1) * self._length], np.int32)


@functools.cache
def _manifest(directory: str, source: str) -> dict:
  """The manifest of shards made by `python -m sparse_lm.prepare`, after checking that every shard it
  lists is there with its documents (a truncated or corrupt shard fails here, in one line)."""
  path = os.path.join(directory, 'manifest.json')
  if not os.path.isfile(path):
    raise ConfigError(f'data.source={source!r}: {directory} has no manifest.json (a corpus made by python -m '
                      'sparse_lm.prepare, finished)')
  with open(path, encoding='utf-8') as f:
    manifest = json.load(f)
  for shards in manifest['splits'].values():
    for shard in shards:
      path = os.path.join(directory, shard['name'])
      records = _shard_records(path)
      if len(records) != shard['documents']:
        raise files_lib.FormatError(f'{path}: holds {len(records)} records, its manifest says '
                                    f'{shard["documents"]} (truncated or corrupt)')
  return manifest


def _shard_records(path: str):
  if not os.path.isfile(path):
    raise files_lib.FormatError(f'{path}: missing (its manifest lists it)')
  try:
    return grain.sources.ArrayRecordDataSource([path])
  # array_record raises RuntimeError or OSError, varying with the fault
  except Exception as e:  # noqa: BLE001
    raise files_lib.FormatError(f'{path}: not a whole ArrayRecord shard ({type(e).__name__}: '
                                f'{str(e).splitlines()[0][:200] if str(e) else ""})') from None


class _Records:
  """A split's shards as one random-access source of token-id arrays; a record that cannot be read
  (a shard damaged after start-up) stops the run in one line."""

  def __init__(self, paths: list[str], dtype: str):
    self._paths = paths
    self._source = grain.sources.ArrayRecordDataSource(paths) if paths else []
    self._dtype = np.dtype(dtype)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    try:
      record = self._source[index]
    except Exception as e:  # noqa: BLE001 -- as above
      raise files_lib.FormatError(f'record {index} of {", ".join(self._paths)[:300]} cannot be read '
                                  f'({type(e).__name__}); the shards are damaged') from None
    return np.frombuffer(record, self._dtype).astype(np.int32)


def tokens_directory(config) -> str | None:
  name, _, arg = config.data.source.partition(':')
  return os.path.abspath(os.path.expanduser(arg)) if name == 'tokens' else None


def _tokens_source(arg: str, config, split: str) -> Corpus:
  """Documents tokenized by `python -m sparse_lm.prepare`: a global shuffle over their records, no
  tokenizing. The split is the one the shards were made with (`data.validation_fraction` does not apply)."""
  directory = tokens_directory(config)
  manifest = _manifest(directory, config.data.source)
  shards = manifest['splits'][split]
  records = _Records([os.path.join(directory, s['name']) for s in shards], manifest['dtype'])
  # The byte count stands in for the tokens: check_source adds an EOS a document, as the reader will.
  return Corpus(grain.MapDataset.source(records), num_bytes=sum(s['tokens'] for s in shards), block=64)


def resolve_tokenizer(config) -> None:
  """For `data.source=tokens:DIR` (or a mixture of such): `data.tokenizer` becomes the tokenizer the
  shards were made with (its copy in DIR) when left at `byte`; one naming another file must be the same
  file (by SHA-256), so every source of a mixture was made with it."""
  for _, _, part in components(config):
    _resolve_for(part, config)


def _resolve_for(part, config) -> None:
  directory = tokens_directory(part)
  if directory is None:
    return
  manifest = _manifest(directory, part.data.source)
  spec = config.data.tokenizer
  if manifest['tokenizer_file'] is None:
    if spec != 'byte':
      raise ConfigError(f'data.tokenizer={spec!r}, but the shards in {directory} were made with byte')
    return
  kind = 'hf' if manifest['tokenizer_file'] == 'tokenizer.json' else 'sentencepiece'
  own = f'{kind}:{os.path.join(directory, manifest["tokenizer_file"])}'
  if spec == 'byte':
    config.data.tokenizer = own
    return
  given = os.path.expanduser(spec.partition(':')[2])
  if not os.path.isfile(given) or files_lib.sha256(given) != manifest['tokenizer_sha256']:
    raise ConfigError(f'data.tokenizer={spec!r} is not the tokenizer the shards in {directory} were made '
                      f'with ({manifest["tokenizer"]!r}); leave data.tokenizer=byte to take theirs')


def _bin_source(pattern: str, config, split: str) -> Corpus:
  """nanoGPT token shards (`.bin`), already tokenized, as windows of `seq_len + 1` tokens (the tokens
  past a shard's last whole window are not read); `data.validation_fraction` of the windows is
  validation. `data.tokenizer` must be the one the shards were made with."""
  length = _window_tokens(config)
  shards = [TextFile(f.name, f.path, files_lib.bin_tokens(f.path).size // length)
            for f in _glob_files(pattern, config.data.source)]
  windows = _Windows(_split_spans(shards, config.data.validation_fraction, split), length)
  return Corpus(grain.MapDataset.source(windows), num_bytes=len(windows) * length, windows=True)


def _record_text(record, key: str) -> str:
  text = record[key]
  return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text


def _tfds_builder(arg: str, config):
  """The dataset's builder, prepared: found in `data.tfds_data_dir` (TFDS's default directory when
  empty), or downloaded and prepared there only when `data.tfds_download` asks for it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow; only tfds needs it
  from absl import logging  # pylint: disable=g-import-not-at-top
  name = arg.replace(':', '/')
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # TFDS warns that an unprepared dataset has no dataset_info.json
  try:
    builder = tfds.builder(name, data_dir=config.data.tfds_data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    first = (str(e).strip().splitlines() or [''])[0]
    raise ConfigError(f'data.source={config.data.source!r}: TFDS has no such dataset ({first})') from None
  finally:
    logging.set_verbosity(verbosity)
  if not builder.is_prepared():
    if not config.data.tfds_download:
      raise ConfigError(
          f'data.source={config.data.source!r}: not prepared in {builder.data_dir} and nothing is downloaded '
          f'at run time; prepare it with `tfds build {name} --file_format=array_record'
          f'{" --data_dir=" + config.data.tfds_data_dir if config.data.tfds_data_dir else ""}`, point '
          'data.tfds_data_dir at where it is, or set data.tfds_download=True')
    builder.download_and_prepare(file_format='array_record')
  return builder


def _tfds_source(arg: str, config, split: str) -> Corpus:
  """A TensorFlow Datasets dataset, read with random access from its array_record files."""
  if not arg:
    raise ConfigError("data.source='tfds:': expected tfds:NAME[:CONFIG]")
  builder = _tfds_builder(arg, config)
  tfds_split = config.data.tfds_split_train if split == 'train' else config.data.tfds_split_eval
  try:
    records = builder.as_data_source(split=tfds_split)
  except (ValueError, KeyError, NotImplementedError) as e:  # an unknown split; a tfrecord-only preparation
    first = (str(e).strip().splitlines() or [''])[0]
    raise ConfigError(f'data.source={config.data.source!r}: TFDS cannot read split {tfds_split!r} with '
                      f'random access ({type(e).__name__}: {first}); prepare it with '
                      '--file_format=array_record, and name splits in data.tfds_split_train|eval') from None
  return Corpus(grain.MapDataset.source(records).map(
      functools.partial(_record_text, key=config.data.tfds_text_key)), num_bytes=None)


@functools.cache
def _hf_splits(arg: str, source: str, download: bool, streaming: bool = False) -> dict:
  """A Hugging Face dataset by the `datasets` library: a directory `save_to_disk` wrote, local data files
  (a directory or glob of JSON, Parquet, CSV or text), or a Hub name (only with `data.hf_download`). No
  dataset code ever runs: the library (3.0 on) no longer runs loading scripts."""
  path, _, name = arg.partition(':')
  path = os.path.expanduser(path)
  if not download and not (os.path.exists(path) or glob.glob(path)):
    raise ConfigError(f'data.source={source!r}: {path} is not a local dataset, and nothing is downloaded at '
                      'run time; set data.hf_download=True to fetch it from the Hub')
  import datasets  # pylint: disable=g-import-not-at-top  # slow; only hf: needs it
  try:
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                   for f in ('dataset_dict.json', 'state.json')):
      loaded = datasets.load_from_disk(path)  # memory-mapped Arrow already: random access, nothing to stream
    else:
      loaded = datasets.load_dataset(path, name or None, streaming=streaming)
  except Exception as e:  # noqa: BLE001 -- the library raises a different error for each way a name fails
    first = (str(e).strip().splitlines() or [''])[0][:300]
    raise ConfigError(f'data.source={source!r}: the datasets library cannot load it ({type(e).__name__}: '
                      f'{first}); it must be a directory save_to_disk wrote, local data files, or (with '
                      'data.hf_download=True) a Hub dataset') from None
  if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
    return dict(loaded)
  return {'': loaded}


def _hf_source(arg: str, config, split: str) -> Corpus:
  """A Hugging Face dataset's rows, the text in `data.tfds_text_key`. Its own split named
  `data.tfds_split_train|eval` where it has one; otherwise `data.validation_fraction` of the train
  split's rows (its last ones) is held out."""
  if not arg:
    raise ConfigError("data.source='hf:': expected hf:PATH_OR_NAME[:CONFIG]")
  splits = _hf_splits(arg, config.data.source, config.data.hf_download, config.data.hf_streaming)
  train_name, eval_name = config.data.tfds_split_train, config.data.tfds_split_eval
  rows = splits.get(train_name, splits.get(''))
  if rows is None:
    raise ConfigError(f'data.source={config.data.source!r} has no split {train_name!r} (it has '
                      f'{sorted(splits)}); name it in data.tfds_split_train')
  import datasets  # pylint: disable=g-import-not-at-top
  if isinstance(rows, datasets.IterableDataset):
    return _hf_stream_corpus(rows, splits.get(eval_name), config, split)
  if split == 'validation' and eval_name in splits:
    rows = splits[eval_name]
  elif eval_name not in splits:
    held = round(config.data.validation_fraction * len(rows))
    kept = range(len(rows) - held, len(rows)) if split == 'validation' else range(len(rows) - held)
    rows = rows.select(kept)
  key = config.data.tfds_text_key
  if key not in rows.column_names:
    raise ConfigError(f'data.source={config.data.source!r} has no text column {key!r} (it has '
                      f'{rows.column_names}); name it in data.tfds_text_key')
  return Corpus(grain.MapDataset.source(rows).map(functools.partial(_record_text, key=key)), num_bytes=None)


def _hf_stream_corpus(rows, eval_rows, config, split: str) -> Corpus:
  """A streamed Hugging Face dataset (`data.hf_streaming`): rows arrive in order, a file at a time, and
  nothing is known of their number. Without a split of its own, every `1 / data.validation_fraction`-th
  row is held out. Train shard j of S keeps every S-th row (`split_dataset_by_node`: whole files per shard
  where their number allows); each resumes from the library's own state (`state_dict`)."""
  from datasets.distributed import split_dataset_by_node  # pylint: disable=g-import-not-at-top
  key = config.data.tfds_text_key
  if key not in (rows.column_names or [key]):
    raise ConfigError(f'data.source={config.data.source!r} has no text column {key!r} (it has '
                      f'{rows.column_names}); name it in data.tfds_text_key')
  every = round(1 / config.data.validation_fraction) if config.data.validation_fraction else 0
  if split == 'validation' and eval_rows is not None:
    rows = eval_rows
  elif eval_rows is None and every:
    held = split == 'validation'
    rows = rows.filter(lambda _, i: (i % every == 0) == held, with_indices=True)
  elif split == 'validation':
    rows = rows.take(0)

  def stream(shard: int, num_shards: int) -> grain.IterDataset:
    return _HfStream(split_dataset_by_node(rows, rank=shard, world_size=num_shards), key, repeat=True)

  return Corpus(_HfStream(rows, key, repeat=False), num_bytes=None, stream=stream)


class _HfStream(grain.IterDataset):
  """The texts of a streamed `datasets.IterableDataset`, read once or repeated epoch after epoch."""

  def __init__(self, rows, key: str, repeat: bool):
    super().__init__()
    self._rows, self._key, self._repeat = rows, key, repeat

  def __iter__(self) -> grain.DatasetIterator:
    return _HfStreamIterator(copy.deepcopy(self._rows), self._key, self._repeat)


class _HfStreamIterator(grain.DatasetIterator):
  """Its state is the epoch and the library's `state_dict` (plain JSON): a resume reads on from the row
  after the last one yielded, as the library restores it. (The rows are never shuffled by the library,
  whose shuffle buffer is not part of its state; the packer's window shuffle is.)"""

  def __init__(self, rows, key: str, repeat: bool):
    super().__init__()
    self._rows, self._key, self._repeat = rows, key, repeat
    self._start = copy.deepcopy(rows.state_dict())  # where every epoch starts
    self._epoch, self._rows_iter, self._yielded = 0, None, False

  def __next__(self) -> str:
    while True:
      if self._rows_iter is None:
        self._rows_iter = iter(self._rows)
      try:
        row = next(self._rows_iter)
      except StopIteration:
        if not (self._repeat and self._yielded):  # one pass, or an empty stream: nothing more comes
          raise
        self._epoch, self._rows_iter, self._yielded = self._epoch + 1, None, False
        self._rows.load_state_dict(copy.deepcopy(self._start))
        continue
      self._yielded = True
      return _record_text(row, self._key)

  def get_state(self) -> dict:
    return {'epoch': self._epoch, 'rows': copy.deepcopy(self._rows.state_dict())}

  def set_state(self, state: dict) -> None:
    self._epoch = state['epoch']
    self._rows.load_state_dict(copy.deepcopy(state['rows']))
    self._rows_iter, self._yielded = None, True


# Synthetic tasks: this many train examples (an epoch, reshuffled every time round) and validation ones.
_SYNTHETIC_SIZES = {'train': 1 << 20, 'validation': 1024}


def _synthetic_args(name: str, arg: str, defaults: dict[str, int]) -> dict[str, int]:
  """'KEY=INT,KEY=INT' over `defaults`, or a ConfigError naming the allowed keys."""
  args = dict(defaults)
  for item in filter(None, arg.split(',')):
    key, _, value = item.partition('=')
    if key not in defaults or not value.lstrip('-').isdigit():
      raise ConfigError(f'data.source={name}:{arg!r}: expected {name}[:KEY=INT,...] with KEY in '
                        f'{sorted(defaults)}')
    args[key] = int(value)
  return args


def mqar_args(arg: str, config) -> dict[str, int]:
  """The settings of `data.source=mqar:ARG` over their defaults."""
  return _synthetic_args('mqar', arg, {'num_kv_pairs': synthetic.default_kv_pairs(config.data.seq_len),
                                       'vocab': 256, 'seed': 0})


def _mqar_source(arg: str, config, split: str) -> Corpus:
  """MQAR (Zoology) examples of exactly `seq_len` tokens, so each packed window is one example.

  Documents are token ids, not text: the MQAR alphabet is the ids [0, vocab) of the byte tokenizer
  (vocab at most 256) or of `data.tokenizer=ids:V` (vocab at most V: Zoology's 8192 with ids:8192). The
  loss counts every token; only the answers after the query keys are predictable, the rest is noise of
  fixed size.
  """
  args = mqar_args(arg, config)
  spec = config.data.tokenizer
  symbols = 256 if spec == 'byte' else int(spec.removeprefix('ids:')) if spec.startswith('ids:') else 0
  if not 4 <= args['vocab'] <= symbols:
    raise ConfigError(f'data.source=mqar: vocab={args["vocab"]} needs 4 <= vocab <= the symbols of '
                      f'data.tokenizer={spec!r} (byte: 256, ids:V: V; SentencePiece has none)')

  def example(index: int) -> np.ndarray:
    return synthetic.mqar_example(synthetic.rng_for(args['seed'], split, index), config.data.seq_len,
                                  args['num_kv_pairs'], args['vocab'])[0]
  pairs, space = args['num_kv_pairs'], (config.data.seq_len - 2 * args['num_kv_pairs']) // 2
  if not 1 <= pairs <= min(space, args['vocab'] // 2 - 1):
    raise ConfigError(f'data.source=mqar: num_kv_pairs={pairs} does not fit data.seq_len='
                      f'{config.data.seq_len} and vocab={args["vocab"]}')
  size = _SYNTHETIC_SIZES[split]
  return Corpus(grain.MapDataset.range(size).map(example), num_bytes=size * config.data.seq_len,
                whole_rows=True)


def _passkey_source(arg: str, config, split: str) -> Corpus:
  """Passkey documents (Mohtashami & Jaggi 2023) of exactly `seq_len` ASCII characters (one byte
  token each), the key at a uniformly random depth and its digits at the end."""
  args = _synthetic_args('passkey', arg, {'digits': 5, 'seed': 0})

  def example(index: int) -> str:
    return synthetic.passkey_document(synthetic.rng_for(args['seed'], split, index), config.data.seq_len,
                                      args['digits'])
  shortest = len(synthetic.PASSKEY_NEEDLE.format(key='0' * args['digits'])) + len(
      synthetic.PASSKEY_QUESTION) + args['digits']
  if config.data.seq_len < shortest or args['digits'] < 1:
    raise ConfigError(f'data.source=passkey: data.seq_len={config.data.seq_len} must be at least '
                      f'{shortest} to hold the key and question, and digits at least 1')
  size = _SYNTHETIC_SIZES[split]
  return Corpus(grain.MapDataset.range(size).map(example), num_bytes=size * config.data.seq_len,
                whole_rows=True)


# `data.source` is 'NAME' or 'NAME:ARG'; each source maps (ARG, config, split) to a Corpus.
SOURCES = {
    'stdlib': _stdlib_source,
    'text': _text_source,
    'tfds': _tfds_source,
    'jsonl': _jsonl_source,
    'parquet': _parquet_source,
    'bin': _bin_source,
    'tokens': _tokens_source,
    'hf': _hf_source,
    'mqar': _mqar_source,
    'passkey': _passkey_source,
}


def corpus(config, split: str) -> Corpus:
  """The 'train' or 'validation' split of `data.source`."""
  name, _, arg = config.data.source.partition(':')
  if name not in SOURCES:
    raise ConfigError(
        f'data.source={config.data.source!r} is not one of stdlib, text:GLOB, jsonl:GLOB[:FIELD], '
        'parquet:GLOB[:COLUMN], bin:GLOB, tokens:DIR, hf:PATH_OR_NAME[:CONFIG], tfds:NAME[:CONFIG], '
        'mqar[:ARGS], passkey[:ARGS]')
  return SOURCES[name](arg, config, split)


def components(config) -> list[tuple[str, float, object]]:
  """`data.mixture` as (name, weight, the config with that `data.source`), or the one source with name
  ''. `data.mixture` is `WEIGHT=SOURCE,...`; a name is the last part of a source's path (made unique)."""
  spec = config.data.mixture
  if not spec:
    return [('', 1.0, config)]
  parts = []
  for item in spec.split(','):
    weight, sep, source = item.partition('=')
    try:
      value = float(weight)
    except ValueError:
      value = -1.0
    if not sep or not source or not 0 <= value < float('inf'):
      raise ConfigError(f'data.mixture={spec!r}: {item!r} is not WEIGHT=SOURCE with a weight >= 0 (for '
                        'example 0.7=tokens:/data/web,0.3=tokens:/data/code)')
    parts.append((value, source))
  if sum(w for w, _ in parts) <= 0:
    raise ConfigError(f'data.mixture={spec!r}: the weights sum to zero')
  named = []
  for i, (weight, source) in enumerate(parts):
    fixed = list(itertools.takewhile(lambda p: not glob.has_magic(p),
                                     pathlib.PurePath(source.partition(':')[2] or source).parts))
    base = re.sub(r'[^A-Za-z0-9]+', '_', fixed[-1] if fixed else '').strip('_')
    name = base if base and sum(1 for _, other in parts if other == source) == 1 else f'{base or "source"}{i}'
    if any(name == n for n, _, _ in named):
      name = f'{name}{i}'
    part = copy.deepcopy(config)
    part.data.source, part.data.mixture = source, ''
    named.append((name, weight, part))
  return named


def train_documents(config):
  """Documents of the train split (of every source of a mixture) in a fixed shuffled order, for training a
  tokenizer: a sample of its first ones spans the whole corpus, not its first files."""
  for _, _, part in components(config):
    train = corpus(part, 'train')
    # A streamed source has no random access: its first documents are the sample.
    for element in train.documents if train.stream else train.documents.shuffle(seed=0):
      yield from element if isinstance(element, list) else [element]


def document_alignment(config) -> int:
  """Where documents must start in a packed row: on multiples of this many tokens, the block grid of
  the model's attention (1 for token-level variants; `sparse_lm.attention.document_alignment`)."""
  from sparse_lm import attention  # the model side; imported here so that data alone stays light
  return attention.document_alignment(config.model)


def _window_tokens(config) -> int:
  return config.data.seq_len + 1  # inputs and targets overlap in all but one token


def check_source(config) -> None:
  """Fails in one line, before anything compiles, on a source (or any source of a mixture) that cannot
  feed a run."""
  for _, _, part in components(config):
    _check_one_source(part)


def _check_one_source(config) -> None:
  """One source's checks.

  Counts bytes, not tokens: exact for the byte tokenizer, an upper bound for SentencePiece (every piece
  covers at least one byte), so this never rejects a source that would work. `eval_batches` makes the
  exact check. Sources that cannot be counted cheaply (tfds) only have their form checked.
  """
  if config.data.seq_len < 1 or config.data.shuffle_buffer < 1:
    raise ConfigError(f'data.seq_len={config.data.seq_len} and data.shuffle_buffer='
                      f'{config.data.shuffle_buffer} must both be at least 1')
  if not 0 <= config.data.validation_fraction < 1:
    raise ConfigError(f'data.validation_fraction={config.data.validation_fraction} must be in [0, 1)')
  if not isinstance(config.data.read_threads, int) or config.data.read_threads < 0:
    raise ConfigError(f'data.read_threads={config.data.read_threads!r} must be an integer >= 0')
  if config.data.packing not in PACKINGS:
    raise ConfigError(f'data.packing={config.data.packing!r} is not one of {", ".join(PACKINGS)}')
  if config.data.packing_bins < 1:
    raise ConfigError(f'data.packing_bins={config.data.packing_bins} must be at least 1')
  train, validation = corpus(config, 'train'), corpus(config, 'validation')
  if train.windows and config.data.packing != 'concat':
    raise ConfigError(f'data.packing={config.data.packing!r} needs document boundaries, and '
                      f'data.source={config.data.source!r} has none (its shards are one stream of tokens, '
                      'read as windows); use data.packing=concat, or prepare its text with sparse_lm.prepare')
  if train.num_bytes is not None:
    train_tokens = train.num_bytes + len(train.documents)  # an EOS after each document
    _check_train_tokens(config, train_tokens)
  if validation.num_bytes is not None:
    _check_validation_tokens(config, validation.num_bytes + len(validation.documents))


def _check_train_tokens(config, num_tokens: int) -> None:
  if num_tokens < _window_tokens(config):
    raise ConfigError(
        f'data.seq_len={config.data.seq_len} is longer than the train split of '
        f'data.source={config.data.source!r}, which has about {num_tokens} tokens')


def _check_validation_tokens(config, num_tokens: int) -> None:
  needed = config.train.batch_size * _window_tokens(config)
  if num_tokens < needed:
    raise ConfigError(
        f'data.seq_len={config.data.seq_len} with train.batch_size={config.train.batch_size} needs '
        f'{needed} validation tokens for one eval batch; data.source={config.data.source!r} has {num_tokens}')


def _host_batch_size(config, process_count: int) -> int:
  if config.train.batch_size % process_count:
    raise ConfigError(
        f'train.batch_size={config.train.batch_size} does not divide over {process_count} processes')
  return config.train.batch_size // process_count


def _tokenize(document, tokenizer) -> dict[str, np.ndarray]:
  """A document's tokens and EOS (a list of documents: each one's); a synthetic task's document is
  already token ids."""
  if isinstance(document, list):
    return {'tokens': np.concatenate([_tokenize(d, tokenizer)['tokens'] for d in document] or
                                     [np.zeros(0, np.int32)])}
  if isinstance(document, np.ndarray):  # pre-tokenized (tokens:, a synthetic task): checked, not trusted
    if document.size and int(document.max()) >= tokenizer.vocab_size:
      raise files_lib.FormatError(f'a document holds token id {int(document.max())}, at or above the '
                                  f'vocabulary of data.tokenizer ({tokenizer.vocab_size})')
    tokens = document
  else:
    tokens = tokenizer.encode(document)
  return {'tokens': np.append(tokens, np.int32(tokenizer.eos_id)).astype(np.int32)}


def _document_ids(document, tokenizer) -> list[np.ndarray]:
  """Each document of an element (a list of them, or one) as BOS, its tokens, EOS: under document
  packing a document carries its own start, so its first token is predicted from its BOS, not from the
  end of another document."""
  documents = document if isinstance(document, list) else [document]
  bos, eos = np.int32(tokenizer.bos_id), np.int32(tokenizer.eos_id)
  return [np.concatenate([[bos], _tokenize(d, tokenizer)['tokens'][:-1], [eos]]).astype(np.int32)
          for d in documents]


def _aligned(ids: np.ndarray, align: int, limit: int | None = None) -> dict[str, np.ndarray]:
  """A document's ids followed by padding up to a multiple of `align` tokens (no further than `limit`),
  and 'real': 1 at its tokens, 0 at the padding. The padding belongs to the document's segment (so segment
  ids stay one run per document) but is never a target (`_inputs_targets`); it makes the next document
  start on the block grid of a variant whose blocks must not straddle documents (NSA, MoBA)."""
  size = -(-len(ids) // align) * align
  if limit is not None:
    size = max(len(ids), min(size, limit))
  real = np.zeros(size, np.int32)
  real[:len(ids)] = 1
  return {'tokens': np.pad(ids, (0, size - len(ids))).astype(np.int32), 'real': real}


def _with_starts(document, tokenizer, align: int = 1) -> dict[str, np.ndarray]:
  """The element's documents concatenated, each padded to a multiple of `align` (`_aligned`), and a 1
  at the first token of each: `segments` packing cuts this stream like `concat` does, then numbers the
  documents inside each row (`_segments`)."""
  docs = [_aligned(ids, align) for ids in _document_ids(document, tokenizer)]
  if not docs:
    return {'tokens': np.zeros(0, np.int32), 'starts': np.zeros(0, np.int32), 'real': np.zeros(0, np.int32)}
  tokens = np.concatenate([d['tokens'] for d in docs])
  starts = np.zeros(len(tokens), np.int32)
  starts[np.cumsum([0] + [len(d['tokens']) for d in docs[:-1]])] = 1
  return {'tokens': tokens, 'starts': starts, 'real': np.concatenate([d['real'] for d in docs])}


def _segments(window: dict[str, np.ndarray], rows_of_seq_len: bool = False) -> dict[str, np.ndarray]:
  """Segment ids (1, 2, ... in the row; a document continued from the row before is a new segment) and
  positions within each segment, for a window cut from the concatenation. `rows_of_seq_len`: the window
  is `seq_len` tokens, not `seq_len + 1` (aligned documents: rows must start on the block grid), and one
  padding token is appended, so the row's last input has no target."""
  starts = window['starts'].copy()
  starts[0] = 1
  index = np.arange(len(starts), dtype=np.int32)
  first = np.maximum.accumulate(np.where(starts == 1, index, 0))
  row = {'tokens': window['tokens'], 'segment_ids': np.cumsum(starts, dtype=np.int32),
         'positions': index - first, 'real': window['real']}
  if rows_of_seq_len:
    row = {k: np.append(v, 0).astype(np.int32) for k, v in row.items()}
  return row


class _Truncate(grain.experimental.FlatMapTransform):
  """An element's documents one by one, each cut to the row (`*_fit` packing); the first cut is said
  once per process, and all are counted (`truncated_documents`)."""

  max_fan_out = 1 << 20

  def __init__(self, tokenizer, length: int, packing: str, align: int = 1):
    self._tokenizer, self._length, self._packing, self._align = tokenizer, length, packing, align

  def flat_map(self, element) -> list[dict[str, np.ndarray]]:
    return [self._cut(ids) for ids in _document_ids(element, self._tokenizer)]

  def _cut(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    if len(ids) > self._length:
      _TRUNCATED[0] += 1
      if _TRUNCATED[0] == 1:
        logging.warning('data.packing=%s: a document of %d tokens is longer than the row (data.seq_len + 1 = '
                        '%d) and is truncated; so is every such document (counted, not said again)',
                        self._packing, len(ids), self._length)
      ids = ids[:self._length]
    return _aligned(ids, self._align, limit=self._length)


_TRUNCATED = [0]  # documents cut to the row by *_fit packing in this process


def truncated_documents() -> int:
  """How many documents `first_fit` / `best_fit` packing has cut to the row in this process."""
  return _TRUNCATED[0]


def _fitted(window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {'tokens': window['tokens'], 'segment_ids': window['tokens_segment_ids'],
          'positions': window['tokens_positions'], 'real': window['real']}


def _checked_window(window: np.ndarray, vocab_size: int, source: str) -> np.ndarray:
  if window.size and int(window.max()) >= vocab_size:
    raise files_lib.FormatError(f'data.source={source!r} holds token id {int(window.max())}, at or above '
                                f'the vocabulary of data.tokenizer ({vocab_size}): the shards were made with '
                                'another tokenizer')
  return window


def _is_full(window: dict[str, np.ndarray]) -> bool:
  """False only for the zero-padded last window of a finite stream (segment id 0 marks padding)."""
  return window['tokens_segment_ids'][-1] != 0


def _one_segment(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A row that is one whole example, as one segment (`Corpus.whole_rows`)."""
  tokens = row['tokens']
  ones = np.ones(len(tokens), np.int32)
  return {'tokens': tokens, 'segment_ids': ones, 'positions': np.arange(len(tokens), dtype=np.int32),
          'real': ones}


def _pack(documents, tokenizer, config, windows: bool = False, seed: int = 0,
          whole_rows: bool = False) -> grain.IterDataset:
  """Rows of `seq_len + 1` tokens by `data.packing`, each a dict: 'tokens', and under document packing
  'segment_ids' (0: padding) and 'positions'. `concat` cuts the concatenation of the tokenized documents
  (each ending in EOS) into rows; `segments` cuts the concatenation of BOS-document-EOS the same way and
  numbers the documents in each row; `first_fit` / `best_fit` pack whole documents into rows with
  padding (grain's packers, over `data.packing_bins` rows at a time). A pre-tokenized source of windows
  gives its windows as they are, with their ids checked against the vocabulary."""
  threads = config.data.read_threads  # each thread keeps about four documents ahead
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)

  def as_iter(dataset):
    return dataset.to_iter_dataset(read) if isinstance(dataset, grain.MapDataset) else dataset

  length = _window_tokens(config)
  packing = config.data.packing
  if windows:
    check = functools.partial(_checked_window, vocab_size=tokenizer.vocab_size, source=config.data.source)
    return as_iter(documents.map(check)).map(lambda window: {'tokens': window})
  if packing == 'concat' or whole_rows:  # whole rows: the cut is the same, each row one segment
    tokens = as_iter(documents.map(functools.partial(_tokenize, tokenizer=tokenizer)))
    rows = grain.experimental.ConcatThenSplitIterDataset(tokens, length_struct={'tokens': length})
    rows = rows.filter(_is_full).map(lambda row: {'tokens': row['tokens']})
    return rows if packing == 'concat' else rows.map(_one_segment)
  align = document_alignment(config)
  if packing == 'segments':
    # Aligned documents need rows that start on the block grid: rows of seq_len, not seq_len + 1.
    length = length if align == 1 else config.data.seq_len
    tokens = as_iter(documents.map(functools.partial(_with_starts, tokenizer=tokenizer, align=align)))
    features = {'tokens': length, 'starts': length, 'real': length}
    rows = grain.experimental.ConcatThenSplitIterDataset(tokens, length_struct=features).filter(_is_full)
    return rows.map(functools.partial(_segments, rows_of_seq_len=align > 1))
  split = grain.experimental.FlatMapIterDataset(as_iter(documents),
                                                _Truncate(tokenizer, length, packing, align))
  packer = (grain.experimental.FirstFitPackIterDataset if packing == 'first_fit' else
            grain.experimental.BestFitPackIterDataset)
  return packer(split, length_struct={'tokens': length, 'real': length},
                num_packing_bins=config.data.packing_bins,
                seed=seed, shuffle_bins=True).map(_fitted)


def _inputs_targets(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The batch of `[b, seq_len + 1]` rows: 'inputs' and 'targets' (shifted by one); under document packing
  also the inputs' 'segment_ids' and 'positions', and 'loss_mask', 1 where the target is the next token
  of the input's own document (0 at padding and where a row passes from one document to the next)."""
  tokens_BL = rows['tokens']
  batch = {'inputs': tokens_BL[:, :-1], 'targets': tokens_BL[:, 1:]}
  if 'segment_ids' in rows:
    seg_BL = rows['segment_ids']
    batch.update(segment_ids=seg_BL[:, :-1], positions=rows['positions'][:, :-1],
                 loss_mask=((seg_BL[:, :-1] != 0) & (seg_BL[:, :-1] == seg_BL[:, 1:])
                            & (rows['real'][:, 1:] != 0)).astype(np.int32))
  return batch


def _json_state(state):
  """`state` with tuples as lists, as it comes back from JSON."""
  if isinstance(state, dict):
    return {k: _json_state(v) for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    return [_json_state(v) for v in state]
  return state


def _grain_state(state):
  """Undoes `_json_state`: grain's concat-then-split compares its slices with tuples, (-1, -1) meaning
  none, so a slice that JSON turned into a list would be taken for a real one."""
  if isinstance(state, dict):
    return {k: _grain_state(v) for k, v in state.items()}
  if isinstance(state, list):
    return tuple(_grain_state(v) for v in state)
  return state


class _JsonStateIterator(grain.DatasetIterator):
  """A grain iterator whose state survives a JSON round trip (the trainer saves it with JsonSave)."""

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return _json_state(self._parent.get_state())

  def set_state(self, state):
    self._parent.set_state(_grain_state(state))


def num_shards(config) -> int:
  """`data.num_shards`, or for 0 the largest power of two that divides `train.batch_size`, at most 64."""
  if config.data.num_shards:
    return config.data.num_shards
  batch = config.train.batch_size
  return min(64, batch & -batch) if batch > 0 else 1


def check_shards(config, process_count: int) -> int:
  """The shard count, or one ConfigError line when it cannot split the batch or the processes."""
  shards = num_shards(config)
  if shards < 1 or config.train.batch_size % shards or shards % process_count:
    raise ConfigError(
        f'data.num_shards={shards} must divide train.batch_size={config.train.batch_size} and be a '
        f'multiple of the process count {process_count} (0: the largest power of two dividing the batch)')
  return shards


class _EpochShuffle(grain.MapDataset):
  """A new permutation of the parent every epoch (index `i` is epoch `i // len`), as grain's `shuffle`.

  Grain's `index_shuffle` keeps no table, so memory does not grow with the corpus, but a call costs about
  4 us at a million elements and grows as the dataset shrinks (0.4 ms at 41, 1.6 ms at 10): a small
  shard of windows or documents spent most of the data path's time there. Up to `_TABLE_MAX` elements the
  epoch's permutation is a table instead (at most 128 KiB a shard); above it, grain's shuffle."""

  _TABLE_MAX = 1 << 15

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = seed
    self._large = parent.shuffle(seed=seed) if len(parent) > self._TABLE_MAX else None
    self._table = (-1, None)  # (epoch, its permutation)

  def __len__(self) -> int:
    return len(self._parent)

  def _shuffled(self, index: int) -> int:
    epoch, within = divmod(index, len(self._parent))
    if self._table[0] != epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._table = (epoch, rng.permutation(len(self._parent)).astype(np.int32))
    return int(self._table[1][within]) + epoch * len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if self._large is not None:
      return self._large[index]
    return self._parent[self._shuffled(index)]

  def _getitems(self, indices):
    if self._large is not None:
      return self._large._getitems(indices)  # noqa: SLF001
    return self._parent._getitems([self._shuffled(i) for i in indices])  # noqa: SLF001


class _WindowShuffle(grain.IterDataset):
  """Reads `size` elements of the parent at a time and yields them in a random order, a new one each
  window. As grain's `WindowShuffleIterDataset`, but the order is one numpy permutation a window rather
  than an `index_shuffle` call an element, which at a window of 256 cost 70 us each (see `_EpochShuffle`).
  Its state is the parent's at the window's start and the position in it, so a resume reads the window
  again and skips what was already yielded."""

  def __init__(self, parent: grain.IterDataset, size: int, seed: int):
    super().__init__(parent)
    self._size, self._seed = size, seed

  def __iter__(self) -> grain.DatasetIterator:
    return _WindowShuffleIterator(self._parent.__iter__(), self._size, self._seed)


class _WindowShuffleIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, size: int, seed: int):
    super().__init__(parent)
    self._size, self._seed = size, seed
    self._window, self._index, self._position = [], 0, 0
    self._start = parent.get_state()

  def _fill(self) -> None:
    self._window = list(itertools.islice(self._parent, self._size))
    order = np.random.default_rng([self._seed, self._index]).permutation(len(self._window))
    self._window = [self._window[i] for i in order]

  def __next__(self):
    if self._position == len(self._window):  # the window is used up (or none was read yet)
      if self._window:
        self._index += 1
      self._start, self._position = self._parent.get_state(), 0
      self._fill()
      if not self._window:
        raise StopIteration
    self._position += 1
    return self._window[self._position - 1]

  def get_state(self) -> dict:
    return {'parent_window_start_state': copy.deepcopy(self._start), 'window_index': self._index,
            'pos_in_window': self._position}

  def set_state(self, state: dict) -> None:
    self._start, self._index = copy.deepcopy(state['parent_window_start_state']), state['window_index']
    self._parent.set_state(self._start)
    self._fill()
    self._position = min(state['pos_in_window'], len(self._window))


def _tagged(row: dict[str, np.ndarray], source: int) -> dict[str, np.ndarray]:
  return {**row, 'source': np.int32(source)}


def _shard_stream(parts: list[tuple[grain.MapDataset, float, Corpus]], tokenizer, config, rows: int
                  ) -> grain.DatasetIterator:
  """One shard's endless stream, `rows` windows at a time, each tagged with the index of its source:
  per source (documents, weight, pre-tokenized), its documents reshuffled every epoch and packed; a
  mixture draws windows from them by weight (grain's mix: deterministic, and its state resumes)."""
  streams = []
  for index, (documents, _, source) in enumerate(parts):
    if isinstance(documents, grain.IterDataset):  # streamed: shuffled within a window of documents
      documents = _WindowShuffle(documents, config.data.shuffle_buffer, config.train.seed)
    else:
      documents = _EpochShuffle(documents, config.train.seed).repeat()
    if source.block > 1:
      documents = documents.batch(source.block, batch_fn=list)
    streams.append(_pack(documents, tokenizer, config, source.windows, config.train.seed,
                         source.whole_rows).map(
        functools.partial(_tagged, source=index)))
  mixed = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, [w for _, w, _ in parts])
  windows = _WindowShuffle(mixed, config.data.shuffle_buffer, config.train.seed)
  return _JsonStateIterator(iter(windows.batch(rows, drop_remainder=True)))


def document_lengths(segment_ids_BT: np.ndarray) -> dict[int, int]:
  """Length -> count of the documents (runs of one nonzero segment id) in each row."""
  B, T = segment_ids_BT.shape
  flat = np.concatenate([segment_ids_BT, np.full((B, 1), -1)], axis=1).reshape(-1)
  starts = np.flatnonzero(np.diff(flat, prepend=-2) != 0)
  runs = np.diff(np.append(starts, len(flat)))
  real = flat[starts] > 0
  lengths, counts = np.unique(runs[real], return_counts=True)
  return dict(zip(lengths.tolist(), counts.tolist(), strict=True))


class ShardedIterator:
  """This host's rows of every global batch, from the shards it owns; its state covers those shards.

  `get_state()` is this host's part, `{'shards': {j: state}}`; `set_state` takes a state holding at
  least this host's shards (a gathered global one, from a checkpoint written by any process count).
  """

  def __init__(self, streams: dict[int, grain.DatasetIterator], num_shards: int, names: list[str]):
    self._streams = streams
    self._num_shards = num_shards
    self.names = names  # of the sources, by index ('' for a single source)
    # Tokens drawn from each source by each shard: part of the state, so counts survive a resume.
    self._drawn = {j: [0] * len(names) for j in streams}
    self._lengths = collections.Counter()  # document lengths in the rows since `take_document_lengths`

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    for j, stream in self._streams.items():
      batch = next(stream)
      real = (batch['segment_ids'][:, :-1] != 0).sum(axis=1) if 'segment_ids' in batch else np.full(
          len(batch['tokens']), batch['tokens'].shape[1] - 1)
      for source, count in zip(batch['source'], real, strict=True):
        self._drawn[j][int(source)] += int(count)
      rows.append(batch)
    batch = _inputs_targets({key: np.concatenate([r[key] for r in rows]) for key in rows[0]})
    if 'segment_ids' in batch:
      self._lengths.update(document_lengths(batch['segment_ids']))
    return batch

  def take_document_lengths(self) -> dict[int, int]:
    """The lengths of the documents (segments) in the rows yielded since the last call, length -> count;
    empty without document packing."""
    lengths, self._lengths = dict(self._lengths), collections.Counter()
    return lengths

  def drawn(self) -> dict[str, int]:
    """Tokens (inputs) drawn from each source so far by this host's shards."""
    return {name: sum(counts[i] for counts in self._drawn.values()) for i, name in enumerate(self.names)}

  def get_state(self) -> dict:
    return {'num_shards': self._num_shards,
            'shards': {str(j): stream.get_state() for j, stream in self._streams.items()},
            'drawn': {str(j): counts for j, counts in self._drawn.items()}}

  def set_state(self, state: dict) -> None:
    shards = state.get('shards', {})
    missing = [j for j in self._streams if str(j) not in shards]
    if state.get('num_shards') != self._num_shards or missing:
      raise ValueError(f'the data state was saved with data.num_shards={state.get("num_shards")} and '
                       f'holds shards {sorted(shards, key=int)}; this run has data.num_shards='
                       f'{self._num_shards} and needs shards {sorted(self._streams)}')
    for j, stream in self._streams.items():
      stream.set_state(shards[str(j)])
      self._drawn[j] = list(state.get('drawn', {}).get(str(j), self._drawn[j]))


def make_train_iterator(config, tokenizer, *, process_index: int = 0,
                        process_count: int = 1) -> ShardedIterator:
  """Endless batches of this host's rows of the train split; `get_state`/`set_state` resume exactly."""
  check_source(config)
  _host_batch_size(config, process_count)
  shards = check_shards(config, process_count)
  parts = []
  for name, weight, part in components(config):
    train = corpus(part, 'train')
    if train.stream is None and len(train.documents) < shards:
      raise ConfigError(f'data.source={part.data.source!r} has {len(train.documents)} train documents, '
                        f'fewer than data.num_shards={shards}; set data.num_shards lower')
    parts.append((name, weight, train))
  per_host = shards // process_count
  rows = config.train.batch_size // shards
  owned = range(process_index * per_host, (process_index + 1) * per_host)
  streams = {j: _shard_stream([(train.stream(j, shards) if train.stream else train.documents[j::shards],
                                weight, train) for _, weight, train in parts], tokenizer, config, rows)
             for j in owned}
  return ShardedIterator(streams, shards, [name for name, _, _ in parts])


def gather_state(iterator: ShardedIterator) -> dict:
  """The state of every shard, from all processes (a collective: every process calls it)."""
  local = iterator.get_state()
  merged = {'shards': {}, 'drawn': {}}
  for state in distributed.allgather_json(local):
    for key in merged:
      merged[key].update(state[key])
  return {**local, **merged}


def eval_sets(config, tokenizer, *, process_index: int = 0, process_count: int = 1) -> dict[str, list]:
  """The evaluation batches of each source (of a mixture; one set named '' otherwise)."""
  return {name: eval_batches(part, tokenizer, process_index=process_index, process_count=process_count)
          for name, _, part in components(config)}


def eval_batches(config, tokenizer, *, process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The first `train.eval_batches` full batches of the validation split, in order; this host's rows.

  Every host packs the whole (small) validation stream and keeps its rows of each global batch, rather
  than reading its own documents: then every host has the same number of batches, as the collective eval
  step needs, and together they evaluate exactly the global batches.
  """
  check_source(config)
  batch_size = _host_batch_size(config, process_count)
  validation = corpus(config, 'validation')
  documents = validation.documents
  global_batches = _pack(documents, tokenizer, config, validation.windows,
                         whole_rows=validation.whole_rows).batch(config.train.batch_size, drop_remainder=True)
  rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
  batches = [_inputs_targets({key: value[rows] for key, value in batch.items()})
             for batch in itertools.islice(global_batches, config.train.eval_batches)]
  if not batches:
    _check_validation_tokens(config, sum(len(_tokenize(text, tokenizer)['tokens']) for text in documents))
  return batches
