"""Shared test set-up: strict rank promotion, a tiny model config, and a helper that runs train.py."""

import atexit
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

# With the compile tier's packages installed (libtpu, the CUDA plugin), JAX would try, and loudly fail, to
# start a TPU and a GPU in every test process; the tests run on the CPU (compile-only devices still work).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# The suite's programs are tiny: compiling them, not running them, is most of its time. Its CPU programs
# compile at LLVM -O0 (deviceless GPU compiles keep XLA's defaults: sparse_lm/aot.py GPU_CODEGEN), and the
# processes of one run (pytest, its xdist workers, the train.py and tool subprocesses the tests start)
# share one compilation cache, removed when the run ends.
FAST_CPU_FLAGS = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')


def xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a subprocess: the suite's fast CPU compiles and `flags`."""
  return ' '.join([*FAST_CPU_FLAGS, *flags])


_flags = os.environ.get('XLA_FLAGS', '').split()
os.environ['XLA_FLAGS'] = ' '.join(_flags + [f for f in FAST_CPU_FLAGS if f not in _flags])
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # the run's first process: workers inherit the cache
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='sparse_lm_test_jax_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from sparse_lm import (  # noqa: E402
  aot,  # noqa: E402,F401  (sets the compile-only backends' environment before JAX starts)
  data,  # noqa: E402
)
from sparse_lm.config import base_config  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write_text_corpus(size: int = 1_100_000) -> pathlib.Path:
  """One file of real text that the tests make themselves, so the repository needs nothing beside it:
  the standard library's UTF-8 source files (the embedded corpus) in name order, concatenated to about
  `size` bytes. Written whole under a temporary name, as parallel workers each write it."""
  parts, total = [], 0
  for f in data._stdlib_files():  # noqa: SLF001
    raw = pathlib.Path(f.path).read_bytes()
    try:
      parts.append(raw.decode('utf-8'))
    except UnicodeDecodeError:  # the few files that test the tokenizer's encoding errors
      continue
    total += len(raw)
    if total >= size:
      break
  path = pathlib.Path(tempfile.gettempdir()) / f'sparse_lm_test_corpus_{size}.txt'
  tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
  tmp.write_text(''.join(parts), encoding='utf-8')
  os.replace(tmp, path)
  return path


CORPUS_FILE = _write_text_corpus()


def write_bpe(directory: pathlib.Path, vocab_size: int = 400, eos: str | None = '<|endoftext|>',
              byte_level: bool = True) -> pathlib.Path:
  """A small BPE tokenizer.json trained here with the `tokenizers` trainer on the test corpus, as a user's
  GPT-2-style tokenizer would be (byte-level; `byte_level=False`: split on whitespace, no byte alphabet),
  with `eos` as its only special token (None: no special token)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE())
  if byte_level:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:
    tok.pre_tokenizer, alphabet = pre_tokenizers.Whitespace(), []
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos] if eos else [],
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(CORPUS_FILE.read_text(encoding='utf-8')[:200_000].splitlines(), trainer)
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / 'tokenizer.json'))
  return directory / 'tokenizer.json'


def tiny_config(**model):
  """A two-layer model small enough that a training step takes milliseconds on one CPU core."""
  c = base_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 64, 4, 2, 16, 128
  m.vocab_size = 259
  m.update(model)
  c.data.seq_len = 64
  c.train.batch_size = 8
  c.train.steps = 30
  c.train.warmup_steps = 5
  c.train.learning_rate = 3e-3
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.train.log_every = 1
  c.checkpoint.every_steps = 10
  return c


def fresh_seed() -> int:
  """A new seed per call: kernels and attention variants are checked on fresh random inputs each run."""
  return int(np.random.default_rng().integers(1 << 30))


def assert_decoding_equals_parallel(model, T: int, P: int, B: int = 2, chunk: int = 3) -> dict:
  """Prefills P random tokens (the whole-sequence path, kernels included), continues with `chunk` tokens
  in one call (the cached path for several tokens), then decodes one token at a time, from a cache sized
  past T as a sampler sizes it: every position's logits equal the parallel forward pass. Returns the
  final cache."""
  tokens_BT = jax.random.randint(jax.random.key(fresh_seed()), (B, T), 0, 259)
  call = nnx.jit(lambda model, tokens, cache: model(tokens, cache))
  parallel_BTV, _ = call(model, tokens_BT, None)
  logits_BPV, cache = call(model, tokens_BT[:, :P], model.init_cache(B, T + 3))
  steps, done = [logits_BPV], P
  if chunk > 1 and P + chunk < T:
    logits_BCV, cache = call(model, tokens_BT[:, P:P + chunk], cache)
    steps, done = steps + [logits_BCV], P + chunk
  for t in range(done, T):
    logits_B1V, cache = call(model, tokens_BT[:, t:t + 1], cache)
    steps.append(logits_B1V)
  np.testing.assert_allclose(jnp.concatenate(steps, 1)[..., :259], parallel_BTV[..., :259],
                             atol=1e-4, rtol=1e-4)
  return cache


def assert_same_loss_and_grads(model_a, model_b, tokens_BT, *, loss_rtol, atol, rtol) -> None:
  def loss(model):
    return jnp.mean(model(tokens_BT)[0][..., :259] ** 2)
  (loss_a, grads_a), (loss_b, grads_b) = (nnx.jit(nnx.value_and_grad(loss))(m) for m in (model_a, model_b))
  np.testing.assert_allclose(loss_b, loss_a, rtol=loss_rtol)
  for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
    np.testing.assert_allclose(gb, ga, atol=atol, rtol=rtol)


@pytest.fixture
def tiny():
  return tiny_config()


TINY_FLAGS = (
    '--config.model.num_layers=2', '--config.model.d_model=64', '--config.model.num_heads=4',
    '--config.model.num_kv_heads=2', '--config.model.head_dim=16', '--config.model.mlp_dim=128',
    '--config.data.seq_len=64', '--config.train.batch_size=8', '--config.train.steps=30',
    '--config.train.warmup_steps=5', '--config.train.eval_every=10', '--config.train.eval_batches=2',
    '--config.train.log_every=1', '--config.checkpoint.every_steps=10',
    f'--config.data.source=text:{CORPUS_FILE}',
)


def train_command(workdir, *extra) -> list[str]:
  return [sys.executable, str(REPO / 'train.py'), f'--workdir={workdir}', *TINY_FLAGS, *extra]


def run_train(workdir, *extra, devices: int = 1, check: bool = True,
              optimize: bool = False) -> subprocess.CompletedProcess:
  """train.py with `extra` flags over TINY_FLAGS; `optimize`: XLA's default CPU code generation, for the
  few runs long enough that running, not compiling, takes their time (-O0 runs about 1.7x slower)."""
  devices_flag = f'--xla_force_host_platform_device_count={devices}'
  env = {**os.environ, 'XLA_FLAGS': devices_flag if optimize else xla_flags(devices_flag),
         'JAX_PLATFORMS': 'cpu'}
  return subprocess.run(train_command(workdir, *extra), env=env, cwd=REPO, capture_output=True,
                        text=True, check=check, timeout=600)


def train_losses(workdir) -> dict[int, float]:
  """Training loss per step; a step logged twice (re-run after a crash) keeps its last value."""
  losses = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    if 'loss' in row:
      losses[row['step']] = row['loss']
  return losses


def eval_lines(workdir) -> list[dict]:
  """The evaluation lines of a run's metrics.jsonl."""
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return [row for row in rows if 'eval_loss' in row]


def resumed_step(output: str) -> int | None:
  """The step a run resumed from, as its start-up line says (None: it started fresh)."""
  match = re.search(r'train: resuming \S+ from step (\d+)', output)
  return int(match.group(1)) if match else None


def train_steps_logged(workdir) -> list[int]:
  """The step of every training line of metrics.jsonl, in order (a resumed run must not repeat one)."""
  rows = map(json.loads, (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines())
  return [row['step'] for row in rows if 'loss' in row]


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` (compiles that take minutes each and repeat what a faster test checks closely)
  run only when asked for: `-m slow`, or SPARSE_LM_SLOW=1 with any selection."""
  if 'slow' in (config.getoption('markexpr') or '') or os.environ.get('SPARSE_LM_SLOW') == '1':
    return
  skip = pytest.mark.skip(reason='slow: run with -m slow or SPARSE_LM_SLOW=1')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)
