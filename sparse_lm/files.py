"""Readers of the file formats pretraining corpora come in, each reading a part of a file at a time.

- JSON lines (`.jsonl`, the format Hugging Face datasets export): one document a line, its text in a
  field. A part is a byte range; a line belongs to the part that holds its first byte.
- Parquet: one document a row, its text in a column, read a row group (or a range of its rows) at a
  time with pyarrow, never a whole file.
- nanoGPT / modded-nanogpt token shards (`.bin`, how FineWeb's GPT-2 tokens are commonly shared): a
  header of 256 int32 (magic 20240520, version 1, the token count), then the tokens as uint16. Read
  through a memory map, a window of tokens at a time.

A reader raises `FormatError`, one line naming the file (and line, for JSON lines), when what it reads is
not what the format promises.
"""

import functools
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq

from sparse_lm.errors import ConfigError

BIN_MAGIC = 20240520
BIN_VERSION = 1
BIN_HEADER_INT32 = 256


class FormatError(ConfigError):
  """A file that is not what its format promises; the message is one line naming it."""


def sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(functools.partial(f.read, 1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


# ----------------------------------------------------------------------------- JSON lines

def _line_number(path: str, offset: int) -> int:
  """The 1-based number of the line starting at byte `offset` (only computed for an error message)."""
  with open(path, 'rb') as f:
    return f.read(offset).count(b'\n') + 1


def jsonl_documents(path: str, start: int, stop: int, field: str) -> list[str]:
  """The `field` of every line of `path` whose first byte is in [start, stop)."""
  documents = []
  with open(path, 'rb') as f:
    if start > 0:
      f.seek(start - 1)
      f.readline()  # the rest of the line that began before `start` (just its newline if none did)
    offset = f.tell()
    while offset < stop:
      line = f.readline()
      if not line:
        break
      if line.strip():
        documents.append(_field(line, field, path, offset))
      offset += len(line)
  return documents


def _field(line: bytes, field: str, path: str, offset: int) -> str:
  try:
    record = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FormatError(f'{path}:{_line_number(path, offset)}: not JSON ({e})') from None
  text = record.get(field) if isinstance(record, dict) else None
  if not isinstance(text, str):
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise FormatError(f'{path}:{_line_number(path, offset)}: no text field {field!r} (it has {keys}); name '
                      'the field as jsonl:GLOB:FIELD')
  return text


# ----------------------------------------------------------------------------- Parquet

def parquet_row_groups(path: str, column: str) -> list[int]:
  """The row count of each row group of `path`, after checking that it has a text `column`."""
  try:
    meta = pq.ParquetFile(path)
  except (OSError, ValueError) as e:
    raise FormatError(f'{path}: not a Parquet file ({e})') from None
  schema = meta.schema_arrow
  if column not in schema.names:
    raise FormatError(f'{path}: no column {column!r} (it has {schema.names}); name it as '
                      'parquet:GLOB:COLUMN')
  kind = schema.field(column).type
  if str(kind) not in ('string', 'large_string', 'string_view'):
    raise FormatError(f'{path}: column {column!r} holds {kind}, not text')
  return [meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)]


def parquet_documents(path: str, row_group: int, start: int, stop: int, column: str) -> list[str]:
  """Rows [start, stop) of one row group's text `column` (nulls skipped)."""
  table = pq.ParquetFile(path).read_row_group(row_group, columns=[column])
  return [text for text in table.column(column).slice(start, stop - start).to_pylist() if text is not None]


# ----------------------------------------------------------------------------- nanoGPT token shards

def bin_tokens(path: str) -> np.memmap:
  """The tokens of a nanoGPT shard, memory-mapped, after checking its header against its size."""
  with open(path, 'rb') as f:
    header = np.frombuffer(f.read(BIN_HEADER_INT32 * 4), np.int32)
  if header.size < 3 or header[0] != BIN_MAGIC or header[1] != BIN_VERSION:
    found = header[:2].tolist() if header.size >= 2 else 'a short file'
    raise FormatError(f'{path}: not a nanoGPT token shard (the header starts with magic {BIN_MAGIC} and '
                      f'version {BIN_VERSION}; found {found})')
  tokens = np.memmap(path, dtype=np.uint16, mode='r', offset=BIN_HEADER_INT32 * 4)
  if tokens.size != header[2]:
    raise FormatError(f'{path}: the header counts {header[2]} tokens but the file holds {tokens.size} '
                      '(truncated or corrupt)')
  return tokens


def write_bin(path: str, tokens: np.ndarray) -> None:
  """Writes `tokens` (ids below 65,536) as a nanoGPT shard."""
  header = np.zeros(BIN_HEADER_INT32, np.int32)
  header[:3] = BIN_MAGIC, BIN_VERSION, len(tokens)
  with open(path, 'wb') as f:
    f.write(header.tobytes())
    f.write(np.asarray(tokens, np.uint16).tobytes())
