"""Decoding's cost, measured where a CPU can: what each step reads from the cache (counted from its
program), the caches' sizes, the decoding helpers against the references, and the first-GPU script's
CPU path end to end (so that its first GPU run does not fail on a typo)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.selected_attention import selected_attention_reference
from sparse_lm import model as model_lib
from sparse_lm.attention import kv_cache
from tests.conftest import REPO, fresh_seed

sys.path.insert(0, str(REPO / 'benchmarks'))
import decode  # noqa: E402  pylint: disable=g-import-not-at-top


def _reads(variant: str, length: int) -> tuple[float, float, dict]:
  """Bytes a layer's decoding step reads (counted) and its rule's ideal, on one layer of the benchmark's
  model (traced on an abstract cache: nothing that size is made)."""
  c = decode.bench_config(variant, layers=1)
  model = model_lib.Transformer(c.model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  cache = jax.eval_shape(lambda: decode.filled_cache(model, 1, length))
  read = decode.cache_reads(decode.decode_step(graphdef), state, cache, jnp.zeros((1, 1), jnp.int32),
                            cache_argnum=1)
  return read, decode.ideal_bytes(c, length), cache


@pytest.mark.parametrize('variant', ['dense', 'sliding_window', 'nsa', 'moba', 'dsa'])
def test_a_decoding_step_reads_what_its_rule_needs(variant):
  """Counted from the step's program: dense reads its whole cache, the sparse variants within a few
  percent of their rule (NSA: compressed blocks, 16 selected blocks, the window; MoBA: block means and 3
  blocks; DSA: every index key and 2,048 rows) and far less than dense at 16K positions."""
  read, ideal, _ = _reads(variant, 16384)
  dense_read, _, _ = _reads('dense', 16384)
  if variant == 'dense':
    assert read == pytest.approx(ideal, rel=1e-3)
    return
  assert ideal <= read <= 1.5 * ideal, (read, ideal)
  assert read < dense_read / 3


def test_the_read_counter_sees_a_whole_cache_read_and_a_slice():
  cache = {'k': jnp.zeros((1, 1000, 4), jnp.float32)}

  def whole(cache, x):
    return jnp.sum(cache['k']) + x

  def window(cache, x):
    return jnp.sum(jax.lax.dynamic_slice_in_dim(cache['k'], 990, 10, 1)) + x
  assert decode.cache_reads(whole, cache, 1.0, cache_argnum=0) == 16000
  assert decode.cache_reads(window, cache, 1.0, cache_argnum=0) == 160


def test_nsa_cache_holds_what_decoding_needs():
  """At 65,536 positions and the paper's sizes, 1.07x dense attention's cache (three branches' full K/V
  were 3.06x): the selection branch's rows, compressed blocks, and rings for the window and phi."""
  caches = {}
  for variant in ('dense', 'nsa'):
    c = decode.bench_config(variant, layers=1)
    model = model_lib.Transformer(c.model, rngs=nnx.Rngs(0))
    caches[variant] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        jax.eval_shape(lambda model=model: model.init_cache(1, 65536)['layers'])))
  assert caches['nsa'] / caches['dense'] == pytest.approx(1.07, abs=0.005)


def test_decoding_attention_helpers_equal_the_references():
  rng = np.random.default_rng(fresh_seed())
  B, T, H, K, D, S = 2, 3, 4, 2, 16, 40
  q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32) for _ in range(2))
  pos_BT = jnp.broadcast_to(jnp.arange(S - T, S), (B, T))
  # Cached rows before the new tokens, and the new tokens' own rows apart.
  keep_BTS = jnp.arange(S - T)[None, None, :] <= pos_BT[:, :, None]
  keep_BTT = pos_BT[:, None, :] <= pos_BT[:, :, None]
  got = kv_cache.attend(q, k[:, :S - T], v[:, :S - T], keep_BTS, new=(k[:, S - T:], v[:, S - T:], keep_BTT))
  want = flash_attention_reference(q, k, v, qpos_BT=pos_BT)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  # Blocks of 8 chosen per group (each once, -1 unused), as decoding's top-k gives them.
  lists = np.stack([rng.permutation(S // 8)[:3] for _ in range(B * T * K)])
  idx_BTKn = jnp.asarray(lists.reshape(B, T, K, 3))
  idx_BTKn = idx_BTKn.at[0, 0, 0, 2].set(-1)
  got = kv_cache.attend_blocks(q, k, v, idx_BTKn, block_size=8, pos_BT=pos_BT)
  want = selected_attention_reference(q, k, v, idx_BTKn, block_size=8, qpos_BT=pos_BT)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_the_ring_keeps_the_last_positions():
  ring = jnp.zeros((1, 4, 1), jnp.float32)
  ring = kv_cache.ring_write(ring, jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1), jnp.arange(6)[None])
  np.testing.assert_array_equal(ring[0, :, 0], [4, 5, 2, 3])  # position p in slot p mod 4
  np.testing.assert_array_equal(kv_cache.ring_positions(4, jnp.asarray(5)), [4, 5, 2, 3])
  assert int(kv_cache.ring_positions(4, jnp.asarray(1))[3]) == kv_cache.NEVER  # not yet written


def test_decode_benchmark_runs_and_reports_slopes(tmp_path):
  out = tmp_path / 'decode.jsonl'
  subprocess.run([sys.executable, 'benchmarks/decode.py', '--lengths=256,512', '--batches=1',
                  '--variants=dense,nsa', '--repeats=1', f'--out={out}', f'--plot={tmp_path / "d.png"}'],
                 cwd=REPO, check=True, capture_output=True, text=True)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert {(r['variant'], r['length']) for r in rows} == {('dense', 256), ('dense', 512), ('nsa', 256),
                                                         ('nsa', 512)}
  assert all(r['ms_per_token'] > 0 and r['read_bytes_per_layer'] > 0 for r in rows)
  assert (tmp_path / 'd.png').stat().st_size > 0


def test_gpu_check_runs_its_cpu_path_end_to_end(tmp_path):
  out = tmp_path / 'gpu_check.json'
  subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--tiny', '--repeats=1', f'--out={out}'],
                 cwd=REPO, check=True, capture_output=True, text=True)
  report = json.loads(out.read_text())
  assert not report['skipped']
  assert report['all_correct'], [r for r in report['sections']['correctness'] if not r.get('passed')]
  assert len(report['sections']['correctness']) == 8
  for name in ('attention', 'layers', 'decode'):
    rows = report['sections'][name]
    assert rows and not [r for r in rows if 'error' in r], rows
  assert report['sections']['train_step']['tokens_per_s'] > 0
