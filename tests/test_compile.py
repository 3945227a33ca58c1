"""The compile tier: every kernel, forward and backward, and whole train and decode steps compiled for
GPUs and TPUs that are not here (sparse_lm/aot.py), with what the compiler reports checked.

Marked `aot`: needs the `aot` extra (libtpu, the CUDA PJRT plugin, ptxas); without it these tests skip,
unless SPARSE_LM_REQUIRE_AOT=1 (CI sets it) makes the missing packages a failure.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from sparse_lm import aot, ladder
from tests.conftest import REPO

_MISSING = [name for name in ('libtpu', 'jax_plugins.xla_cuda12', 'nvidia.cuda_nvcc')
            if importlib.util.find_spec(name) is None]
if _MISSING and os.environ.get('SPARSE_LM_REQUIRE_AOT') == '1':
  raise ImportError(f'SPARSE_LM_REQUIRE_AOT=1 but {_MISSING} are not installed: pip install -e ".[aot]"')
pytestmark = [pytest.mark.aot, pytest.mark.skipif(
    bool(_MISSING), reason=f'needs pip install -e ".[aot]" ({_MISSING} missing)')]

GPU_TARGETS = ('h100', 'a100')
TPU_TARGETS = ('v5e:2x2', 'v5p:2x2x1', 'v6e:2x2')
TPU_SLICE = 'v5e:2x4'  # 8 chips; v5p:2x2x2 compiles the same steps about twice as slowly here
KERNEL_NAMES = {
    'flash_attention': {'flash_attention_fwd', 'flash_attention_dq', 'flash_attention_dkv'},
    'compressed_attention': {f'compressed_attention_{k}' for k in ('fwd', 'dq', 'dkv')},
    'block_selection': {'block_selection'},
    'selected_attention': {'selected_attention_fwd', 'selected_attention_dq', 'selected_attention_dkdv'},
    'token_attention': {'token_attention_fwd', 'token_attention_dq', 'token_attention_dkdv'},
    'grouped_matmul': {'grouped_matmul', 'transposed_grouped_matmul'},
}
# (head_dim, group size Hq / Hkv, sequence length): head_dim 64 and 128, groups 1, 3, 4 and 16, and one
# case of each attention kernel at 65,536 tokens.
ATTENTION_CASES = [(64, 1, 4096), (128, 3, 4096), (64, 4, 65536), (128, 16, 4096)]
# grouped matmul: rows B*T over 8 experts of [Hq*D, Hkv*D]; the long case has 65,536 rows.
GMM_CASES = [(64, 4, 65536), (128, 1, 4096)]
# NSA's compressed attention (flash attention's bodies on strided keys) and block selection: the long case
# and one more, the paper's blocks (l=32, d=16, l'=64, n=16).
NSA_CASES = [(64, 4, 65536), (128, 3, 4096)]
CASES = ([(k, *c) for k in ('flash_attention', 'selected_attention') for c in ATTENTION_CASES]
         + [(k, *c) for k in ('compressed_attention', 'block_selection') for c in NSA_CASES]
         + [('grouped_matmul', *c) for c in GMM_CASES])
# DSA's token attention (2,048 listed tokens a query, the paper's top-k) has a GPU body only: on TPU
# token-level selection runs as blocks, through selected_attention.
GPU_CASES = CASES + [('token_attention', *c) for c in ATTENTION_CASES]
# A TPU compile takes 5 to 40 s here, so each chip compiles every kernel at its long case and the
# attention kernels at one more case; the chips between them cover every head_dim and group.
TPU_EXTRA = {'v5e:2x2': (128, 3, 4096), 'v5p:2x2x1': (64, 1, 4096), 'v6e:2x2': (128, 16, 4096)}
TPU_CASES = ([(t, kernel, *case) for t in TPU_TARGETS for kernel, *case in CASES if case[2] == 65536]
             + [(t, kernel, *case) for t, case in TPU_EXTRA.items()
                for kernel in ('flash_attention', 'selected_attention')])


_targets = {}


def target(name: str) -> aot.Target:
  if name not in _targets:
    _targets[name] = aot.get_target(name)
  return _targets[name]


def compile_kernel(kernel, target_name, head_dim, group, seq_len, **options) -> aot.Report:
  t = target(target_name)
  kv_heads = 2 if group < 16 else 1
  lowered = aot.lower_kernel(kernel, t, seq_len=seq_len, q_heads=group * kv_heads, kv_heads=kv_heads,
                             head_dim=head_dim, **options)
  return aot.compile_lowered(lowered, t)


def compiled_kernels(kernel, target_name, head_dim, group, seq_len) -> dict[str, dict]:
  """The kernels of one compiled kernel case by name; it must compile and hold exactly its kernels."""
  report = compile_kernel(kernel, target_name, head_dim, group, seq_len)
  assert report.compiled, report.error
  by_name = {k['name']: k for k in report.kernels}
  assert set(by_name) == KERNEL_NAMES[kernel]
  return by_name


@pytest.mark.parametrize('kernel,head_dim,group,seq_len', GPU_CASES)
@pytest.mark.parametrize('target_name', GPU_TARGETS)
def test_gpu_kernels_compile_without_spills(target_name, kernel, head_dim, group, seq_len):
  by_name = compiled_kernels(kernel, target_name, head_dim, group, seq_len)
  gpu = target(target_name).gpu
  for name, k in by_name.items():
    assert k['spill_store_bytes'] == 0 and k['spill_load_bytes'] == 0, (name, k)
    assert 0 < k['registers'] <= 255 and 0 < k['shared_memory_bytes'] <= gpu.smem_per_block_optin, (name, k)


@pytest.mark.parametrize('kernel', ['flash_attention', 'compressed_attention', 'block_selection'])
@pytest.mark.parametrize('target_name', GPU_TARGETS + TPU_TARGETS)
def test_kernels_with_segments_compile_at_64k(target_name, kernel):
  """Segment ids (packed documents) in both bodies of each kernel that takes them, forward and backward,
  at 65,536 tokens and head_dim 128 (the most registers and shared memory; 64 compiles too): compiled,
  the kernel's own kernels, and on GPUs no spills within the registers and shared memory a block has.
  Flash attention's peak memory: within 1% of the same call without segments, plus on TPUs the ids'
  column layouts ([T, 1] int32, which Mosaic's tiling pads to 128 lanes: 32 MiB at 65,536 tokens each,
  as splash attention's lane-broadcast query ids cost)."""
  options = dict(seq_len=65536, q_heads=8, kv_heads=2, head_dim=128)
  t = target(target_name)
  packed = aot.compile_lowered(aot.lower_kernel(kernel, t, segments=True, **options), t)
  assert packed.compiled, packed.error
  by_name = {k['name']: k for k in packed.kernels}
  assert set(by_name) == KERNEL_NAMES[kernel]
  if kernel == 'flash_attention':
    plain = aot.compile_lowered(aot.lower_kernel(kernel, t, **options), t)
    padded_columns = 0 if t.gpu is not None else 2 * 65536 * 128 * 4
    assert packed.memory['peak_bytes'] <= 1.01 * plain.memory['peak_bytes'] + padded_columns
  if t.gpu is not None:
    for name, k in by_name.items():
      assert k['spill_store_bytes'] == 0 and k['spill_load_bytes'] == 0, (name, k)
      assert 0 < k['registers'] <= 255, (name, k)
      assert 0 < k['shared_memory_bytes'] <= t.gpu.smem_per_block_optin, (name, k)


@pytest.mark.parametrize('head_dim', [64, 128])
@pytest.mark.parametrize('target_name', GPU_TARGETS + ('v5e:2x2',))
def test_moba_blocks_compile_without_spills(target_name, head_dim):
  """MoBA's blocks of 512 keys (3 a query, at 65,536 tokens): taken whole, dk/dv spilled at head_dim 64
  and 128 asked more shared memory than an H100 block has; the GPU bodies now walk them 64 keys a step."""
  t = target(target_name)
  lowered = aot.lower_kernel('selected_attention', t, seq_len=65536, q_heads=8, kv_heads=2,
                             head_dim=head_dim, selected=3, block_size=512)
  report = aot.compile_lowered(lowered, t)
  assert report.compiled, report.error
  assert {k['name'] for k in report.kernels} == KERNEL_NAMES['selected_attention']
  for k in report.kernels:
    if t.gpu:
      assert k['spill_store_bytes'] == 0 and k['spill_load_bytes'] == 0, k
      assert k['shared_memory_bytes'] <= t.gpu.smem_per_block_optin, k
    else:
      assert k['scoped_vmem_bytes'] > 0, k


@pytest.mark.parametrize('target_name,kernel,head_dim,group,seq_len', TPU_CASES)
def test_tpu_kernels_compile(target_name, kernel, head_dim, group, seq_len):
  by_name = compiled_kernels(kernel, target_name, head_dim, group, seq_len)
  assert all(k['scoped_vmem_bytes'] > 0 for k in by_name.values()), by_name


@pytest.mark.parametrize('target_name', ['h100', 'v5e:2x2'])
def test_block_selection_holds_no_score_matrix(target_name):
  """At 65,536 tokens the selection's temporaries stay below its output, the [T, n] indices: no [T, C]
  or [T, S] buffer exists (the old path held [T, C] float32 per head, 1 GiB here)."""
  report = compile_kernel('block_selection', target_name, 128, 4, 65536)
  assert report.compiled, report.error
  assert report.memory['output_bytes'] == 65536 * 2 * 16 * 4
  assert report.memory['temp_bytes'] <= report.memory['output_bytes'], report.memory


def test_too_much_shared_memory_is_refused():
  """Three pipeline stages of 128 x 64 blocks at head_dim 128 need 198,656 bytes of shared memory; an
  A100 block has 166,912 (an H100 block 232,448, so the same kernel compiles there)."""
  big = dict(block_q=128, block_k=64, num_stages=3)
  refused = compile_kernel('flash_attention', 'a100', 128, 4, 4096, **big)
  assert not refused.compiled and 'Shared memory size limit exceeded' in refused.error, refused.error
  assert compile_kernel('flash_attention', 'h100', 128, 4, 4096, **big).compiled


def test_spills_are_reported():
  """With 4 warps the dk/dv kernel spills at head_dim 128 (why GPU_NUM_WARPS is 8): the no-spill check
  above can fail."""
  report = compile_kernel('flash_attention', 'h100', 128, 4, 4096, num_warps=4)
  dkv = next(k for k in report.kernels if k['name'] == 'flash_attention_dkv')
  assert dkv['spill_store_bytes'] > 0, dkv


def test_gpu_kernels_compile_as_xla_defaults_whatever_xla_flags_say():
  """This suite compiles its CPU programs at LLVM -O0 (conftest.py); a deviceless GPU compile still
  reports the registers of XLA's default code generation (aot.GPU_CODEGEN): those of a process without
  the suite's flags."""
  assert '--xla_backend_optimization_level=0' in os.environ['XLA_FLAGS']
  mine = {k['name']: k['registers'] for k in compile_kernel('flash_attention', 'h100', 64, 4, 65536).kernels}
  script = ('import json; from sparse_lm import aot; t = aot.get_target("h100"); lowered = aot.lower_kernel('
            '"flash_attention", t, seq_len=65536, q_heads=8, kv_heads=2, head_dim=64); print(json.dumps('
            '{k["name"]: k["registers"] for k in aot.compile_lowered(lowered, t).kernels}))')
  env = {**os.environ, 'XLA_FLAGS': '', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  run = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True,
                       check=True)
  assert mine == json.loads(run.stdout.strip().splitlines()[-1]) and len(mine) == 3


# ----------------------------------------------------------------------------- whole steps

def _small(config, seq_len=None, **mesh):
  """A rung cut to one layer and 16 sequences: every kernel and collective a layer of the full model
  has, compiled in seconds (a TPU compile of MoSA or routing layers takes minutes per layer here). The
  shorter sequences of some variants halve their TPU compile here and change no kernel or collective."""
  config.model.num_layers = 1
  config.train.batch_size = 16
  config.data.seq_len = seq_len or config.data.seq_len
  config.mesh.update(data=1, **mesh)
  return config


STEP_CONFIGS = {
    'dense': lambda: _small(ladder.dense_config('100m'), fsdp=4, tensor=2, expert=1),
    'nsa': lambda: _small(ladder.nsa_config('100m'), fsdp=4, tensor=2, expert=1, seq_len=1024),
    'routing_causal': lambda: _small(ladder.routing_config('100m', causal=True), fsdp=4, tensor=2, expert=1,
                                     seq_len=512),
    'moe': lambda: _small(ladder.moe_config('100m'), fsdp=2, tensor=2, expert=2, seq_len=512),
    'moba': lambda: _small(ladder.variant_config('100m', 'moba'), fsdp=4, tensor=2, expert=1, seq_len=2048),
    'dsa': lambda: _small(ladder.variant_config('100m', 'dsa'), fsdp=4, tensor=2, expert=1, seq_len=4096),
}
STEP_KERNELS = {'dense': {'flash_attention_fwd'},
                'nsa': {'compressed_attention_fwd', 'block_selection', 'selected_attention_fwd',
                        'flash_attention_fwd'},
                'routing_causal': {'flash_attention_fwd'}, 'moe': {'grouped_matmul'},
                'moba': {'selected_attention_fwd', 'selected_attention_dkdv'},
                # On GPU with a dense warm-up: both stages' kernels, under the stage's lax.cond.
                'dsa': {'token_attention_fwd', 'token_attention_dkdv', 'flash_attention_fwd'}}


def _step_config(variant: str, target_name: str):
  config = STEP_CONFIGS[variant]()
  if variant == 'dsa' and target_name == TPU_SLICE:  # no token-gather body on TPU: blocks of 64
    config.model.dsa.block_size = 64
  elif variant == 'dsa':
    config.model.dsa.dense_warmup_steps = 100
  return config


def _step_kernels(variant: str, target_name: str) -> set[str]:
  if variant == 'dsa' and target_name == TPU_SLICE:
    return {'selected_attention_fwd', 'selected_attention_dkdv'}
  return STEP_KERNELS[variant]


# On the TPU slice only the variant with no 1b config: the others' TPU train steps are compiled by
# the shipped-plan test below (v5p, 8 chips), which checks their kernels too.
@pytest.mark.parametrize('target_name,variant', [('h100x8', v) for v in sorted(STEP_CONFIGS)] +
                         [(TPU_SLICE, 'routing_causal')])
def test_train_step_compiles_on_eight_devices(target_name, variant):
  from sparse_lm import compile as aot_compile  # noqa: PLC0415
  report = aot_compile.compile_config(_step_config(variant, target_name), target_name)
  assert report['compiled'] and report['fits'], report['error'] or report['memory_per_device']
  assert report['num_devices'] == 8 and report['mesh']['tensor'] == 2
  assert _step_kernels(variant, target_name) <= {k['name'] for k in report['kernels']}, report['kernels']


def test_moe_expert_gradients_are_reduced_once_a_step_however_many_microbatches():
  """The experts' weight gradients leave the dispatch shard_map unreduced, so XLA sums them once after the
  microbatch loop, as it does the dense layers'. With a psum inside the shard_map this step sent 145 MB
  per device at 1 microbatch (the experts' gradients reduced twice) and 552 MB at 4; now 79 and 90 MB."""
  from sparse_lm import compile as aot_compile  # noqa: PLC0415
  sent = {}
  for accum in (1, 4):
    config = _small(ladder.moe_config('100m'), seq_len=256)
    config.mesh.data, config.train.batch_size, config.train.grad_accum_steps = 8, 32, accum
    report = aot_compile.compile_config(config, 'h100x8')
    assert report['compiled'], report['error']
    sent[accum] = report['collectives']['bytes_per_device']
  assert sent[4] < 1.25 * sent[1], sent


def test_decode_step_compiles():
  from sparse_lm import compile as aot_compile  # noqa: PLC0415
  config = _small(ladder.nsa_config('100m'), fsdp=1, tensor=1, expert=1)
  report = aot_compile.compile_config(config, 'h100', step='decode')
  assert report['compiled'] and report['fits'], report['error']
  assert report['memory_per_device']['argument_bytes'] > 0


# ----------------------------------------------------------------------------- the command

def _compile_command(*flags):
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}
  return subprocess.run([sys.executable, '-m', 'sparse_lm.compile', *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_command_prints_one_json_object_and_exits_by_fit():
  flags = ('--config=configs/dense_100m.py', '--target=h100', '--config.model.num_layers=1',
           '--config.train.batch_size=4')
  ok = _compile_command(*flags)
  assert ok.returncode == 0, ok.stderr[-2000:]
  report = json.loads(ok.stdout)
  assert report['compiled'] and report['fits'] and report['device_kind'] == 'NVIDIA H100 80GB HBM3'
  assert report['memory_per_device']['peak_bytes'] <= report['memory_limit_bytes']
  tight = _compile_command(*flags, '--memory_fraction=0.001')
  assert tight.returncode != 0 and 'does not fit' in tight.stderr.splitlines()[-1], tight.stderr[-500:]
  assert json.loads(tight.stdout)['fits'] is False


@pytest.mark.parametrize('flags,match', [
    (('--target=h200',), 'not a known target'),
    (('--target=v5e:9x9',), 'libtpu refuses'),
    (('--target=h100', '--step=eval'), '--step'),
    (('--target=h100x8', '--config.mesh.fsdp=3'), 'mesh'),
])
def test_command_refuses_bad_input_in_one_line(flags, match):
  run = _compile_command('--config=configs/dense_1m.py', *flags)
  assert run.returncode != 0 and not run.stdout
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith('compile error:') and match in last, run.stderr[-1000:]


def test_fit_finds_a_plan_where_the_shipped_one_does_not_fit():
  # dense 100m at 4 layers on XLA's attention (the search does not depend on the kernels; their Triton
  # compiles tripled this test's time): 1.6 GiB per device as shipped (8-way data parallel), more than 1%
  # of an H100 (0.8 GiB); the second plan tried fits.
  flags = ('--config=configs/dense_100m.py', '--target=h100x8', '--config.model.num_layers=4',
           '--config.train.batch_size=32', '--config.model.kernel=xla', '--memory_fraction=0.01')
  run = _compile_command(*flags, '--fit', '--fit_compiles=2')
  assert run.returncode == 0, run.stderr[-2000:]
  found = json.loads(run.stdout)
  assert found['report']['fits'] and found['report']['compiled']
  assert found['report']['memory_per_device']['peak_bytes'] <= found['report']['memory_limit_bytes']
  assert found['report']['collectives']['bytes_per_device'] > 0
  tried = [row for row in found['tried'] if row['compiled']]
  assert len(tried) >= 2 and any(not row['fits'] for row in tried)
  shipped = next(row for row in tried if row['plan'] == 'data=8 recompute=none grad_accum=1')
  assert not shipped['fits']  # the plan the config ships, tried first, does not fit
  assert all(f'{row["peak_bytes"] / 2**30:.1f} GiB' in run.stderr for row in tried)
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith('plan for h100x8: --config.mesh.data=') and ' '.join(found['overrides']) in last
  # The printed overrides, applied as a user would, compile and fit.
  check = _compile_command(*flags, *found['overrides'])
  assert check.returncode == 0, check.stderr[-1000:]


def test_fit_refuses_bad_input_in_one_line():
  run = _compile_command('--config=configs/dense_1m.py', '--target=h100x8', '--fit', '--step=decode')
  last = run.stderr.strip().splitlines()[-1]
  assert run.returncode != 0 and 'fit error: --fit plans the train step' in last
  run = _compile_command('--config=configs/dense_1m.py', '--target=h100x8', '--fit', '--fit_compiles=0')
  assert run.returncode != 0 and 'fit error: --fit_compiles=0' in run.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- shipped plans

PLAN_TARGETS = ('h100x8', 'v5p:2x2x2')


def _shipped_1b(variant: str, target_name: str):
  config = ladder.moe_config('1b') if variant == 'moe' else ladder.variant_config('1b', variant)
  if target_name.startswith('v5p'):
    for key, value in ladder.V5P_OVERRIDES.get((variant, '1b'), {}).items():
      section, name = key.split('.')
      config[section][name] = value
    if variant == 'dsa':  # no token-gather body on TPU: selection in blocks of 64 (to_dsa's docstring)
      config.model.dsa.block_size = 64
  return config


# On v5p, where every 1b plan has a margin (45.0-75.4 GiB of 85.5, extrapolated; BENCHMARKS.md), the
# checks take 2-3 minutes each and run with `-m slow`; the default run checks the tighter h100x8 plans.
@pytest.mark.parametrize('target_name,variant', [
    pytest.param(target, variant, marks=[pytest.mark.slow] if target.startswith('v5p') else [])
    for target in PLAN_TARGETS for variant in ('dense', 'nsa', 'moba', 'dsa', 'moe')])
def test_the_1b_rung_fits_eight_devices_with_its_shipped_plan(target_name, variant, tmp_path):
  """The plan each 1b config ships (sparse_lm/ladder.py PLANS; on v5p with its documented override)
  compiles and fits, by the planner's reduced-depth extrapolation with a 5% margin (it came within -5.5%
  to +4.4% of full compiles, which are in BENCHMARKS.md, "Plans", and take minutes each)."""
  from sparse_lm import compile as aot_compile  # noqa: PLC0415
  from sparse_lm import plan  # noqa: PLC0415
  config = _shipped_1b(variant, target_name)
  target = aot.get_target(target_name)
  kernels = str(tmp_path / 'kernels')  # the two depths share their GPU kernels, as in `--fit`
  result = plan.evaluate(config, plan.shipped_plan(config, 8), target,
                         lambda c: aot_compile.compile_config(c, target_name, kernel_cache=kernels))
  limit = 0.95 * 0.9 * target.memory_bytes
  assert result['compiled'], result['error']
  assert result['peak_bytes'] <= limit, f'{result["peak_bytes"] / aot.GIB:.1f} GiB > {limit / aot.GIB:.1f}'
  # The variant's own kernels are in the step (DSA sparse from step 0: no dense stage's flash attention).
  want = _step_kernels(variant, TPU_SLICE if target_name.startswith('v5p') else target_name)
  want = want - {'flash_attention_fwd'} if variant == 'dsa' else want
  assert want <= set(result['kernels']), result['kernels']
