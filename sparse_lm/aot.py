"""Ahead-of-time compilation for GPUs and TPUs that are not attached: targets, devices and reports.

A compile for an accelerator needs only its compiler, not the device. TPU: libtpu (`jax[tpu]`) makes
compile-only devices from a topology name (`v5e:2x2`, `v5p:2x2x1`, ...). NVIDIA: the jax-cuda12 PJRT
plugin makes them from a `GpuTargetConfigProto` (the device's limits, written below from public
specifications), and XLA compiles the whole program for that device, Triton kernels through `ptxas`.
Lowering alone (what `jit(...).lower(...)` checks) never meets the limits only the compiler sees:
shared and scalar memory, registers, spills.

What a report holds: per-device bytes from `memory_analysis()` and every kernel call with what the
compiler says of it (GPU: grid, threads, shared memory from XLA's thunk sequence; registers, stack and
spills from `ptxas -v` on the PTX XLA emitted; TPU: the Mosaic kernels by name, as Mosaic reports no
per-kernel resources to JAX). Deviceless compiles skip autotuning, so a few of XLA's own fusions differ
from a compile on the device; the Pallas kernels do not. Nothing here measures time.

Importing this module sets the environment the compile-only backends need, so import it before JAX
initialises a backend (`sparse_lm/compile.py` and `tests/conftest.py` do).
"""

import dataclasses
import functools
import glob
import math
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time

os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')  # the plugin's check calls a driver
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # libtpu asks for hosts it will not use
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compile-only: no chip to lock (pytest -n 2)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import mesh_utils, topologies  # noqa: E402

from pallas_kernels import (  # noqa: E402
  block_selection,
  compressed_attention,
  flash_attention,
  grouped_matmul,
  selected_attention,
  token_attention,
)

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Gpu:
  """An NVIDIA GPU as XLA's GpuDeviceInfoProto describes it.

  Numbers from NVIDIA's public specifications (the H100 and A100 datasheets and the CUDA C Programming
  Guide's compute-capability tables); memory is what the driver reports for the 80 GB parts.
  """
  name: str
  compute_capability: tuple[int, int]
  sm_count: int
  smem_per_sm: int
  smem_per_block_optin: int
  fp32_per_sm: int
  clock_ghz: float
  memory_bytes: int
  bandwidth_bytes_per_s: int
  l2_bytes: int

  def target_config(self) -> str:
    major, minor = self.compute_capability
    return f'''gpu_device_info {{
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {self.smem_per_block_optin}
  shared_memory_per_core: {self.smem_per_sm}
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: {self.fp32_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.bandwidth_bytes_per_s}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{self.name}"
'''

  @property
  def ptxas_arch(self) -> str:
    major, minor = self.compute_capability
    return f'sm_{major}{minor}' + ('a' if major >= 9 else '')


GPUS = {
    # H100 SXM5: 132 SMs, 228 KiB shared memory per SM of which 227 KiB per block, 1.98 GHz boost,
    # 3.35 TB/s HBM3, 50 MiB L2.
    'h100': Gpu('NVIDIA H100 80GB HBM3', (9, 0), 132, 233472, 232448, 128, 1.98, 81559 * 2**20,
                3_350_000_000_000, 50 * 2**20),
    # A100 SXM4 80GB: 108 SMs, 164 KiB shared memory per SM of which 163 KiB per block, 1.41 GHz boost,
    # 2.04 TB/s HBM2e, 40 MiB L2.
    'a100': Gpu('NVIDIA A100-SXM4-80GB', (8, 0), 108, 167936, 166912, 64, 1.41, 81920 * 2**20,
                2_039_000_000_000, 40 * 2**20),
}

# HBM per chip, from Google Cloud's TPU system-architecture pages.
TPU_HBM = {'v4': 32 * GIB, 'v5e': 16 * GIB, 'v5litepod': 16 * GIB, 'v5p': 95 * GIB, 'v6e': 32 * GIB}

_GPU_TARGET = re.compile(r'^(?P<gpu>[a-z]\d+)(?:x(?P<per_host>\d+))?(?:x(?P<hosts>\d+))?$')


class TargetError(ValueError):
  """A target name that names no device this module can compile for."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str  # 'cuda' or 'tpu'
  devices: tuple
  memory_bytes: int  # per device
  gpu: Gpu | None = None

  @property
  def num_hosts(self) -> int:
    return len({d.process_index for d in self.devices})


def target_names_help() -> str:
  return (f'GPUs {sorted(GPUS)}, optionally xPER_HOST[xHOSTS] (h100x8, h100x8x2); TPU topologies '
          f'{{{",".join(sorted(TPU_HBM))}}}:SHAPE (v5e:2x2, v5p:2x2x1, v6e:2x4)')


def get_target(name: str) -> Target:
  """Compile-only devices for `name`; a TargetError naming what is allowed otherwise."""
  match = _GPU_TARGET.match(name)
  if match and match['gpu'] in GPUS:
    gpu = GPUS[match['gpu']]
    per_host, hosts = int(match['per_host'] or 1), int(match['hosts'] or 1)
    topo = topologies.get_topology_desc(platform='cuda', target_config=gpu.target_config(),
                                        topology=f'1x{hosts}x{per_host}')
    return Target(name, 'cuda', tuple(topo.devices), gpu.memory_bytes, gpu)
  chip = name.split(':')[0]
  if chip in TPU_HBM and ':' in name:
    try:
      topo = topologies.get_topology_desc(platform='tpu', topology_name=name)
    except jax.errors.JaxRuntimeError as e:
      raise TargetError(f'--target={name}: libtpu refuses the topology ({str(e).splitlines()[0]}); '
                        f'allowed: {target_names_help()}') from e
    return Target(name, 'tpu', tuple(topo.devices), TPU_HBM[chip])
  raise TargetError(f'--target={name!r} is not a known target; allowed: {target_names_help()}')


def make_mesh(target: Target, shape: tuple[int, ...], axis_names: tuple[str, ...]) -> jax.sharding.Mesh:
  """The mesh over the target's devices, laid out on the physical topology as `jax.make_mesh` would."""
  devices = mesh_utils.create_device_mesh(shape, list(target.devices), allow_split_physical_axes=True)
  return jax.sharding.Mesh(np.asarray(devices), axis_names, axis_types=(jax.sharding.AxisType.Auto,) *
                           len(axis_names))


# ----------------------------------------------------------------------------- compiling and reporting


@dataclasses.dataclass
class Report:
  """One compile: what came out, per device."""
  compiled: bool
  error: str | None
  compile_seconds: float
  memory: dict
  kernels: list[dict]
  bytes_accessed: int | None = None  # XLA's cost model: bytes one execution reads and writes
  collectives: dict = dataclasses.field(default_factory=dict)  # `collectives(...)` of the program

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def one_line(error: BaseException) -> str:
  """The line of an XLA error that says what ran out, without the allocation dump that follows."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  for line in lines:
    if 'RESOURCE_EXHAUSTED' in line or 'limit exceeded' in line or 'Ran out of memory' in line:
      return line[:400]
  return (lines[0] if lines else type(error).__name__)[:400]


GPU_CODEGEN = {'xla_backend_optimization_level': 3, 'xla_llvm_disable_expensive_passes': False}


def compile_lowered(lowered, target: Target, *, kernel_cache: str | None = None) -> Report:
  """Compiles `lowered` (a `jax.stages.Lowered` for the target's devices) and reports on it. GPU: with
  `kernel_cache` (a file) XLA reuses the kernels compiled into it by earlier compiles and adds its own;
  a reused kernel reports no registers or spills (ptxas does not run for it)."""
  dump = tempfile.mkdtemp(prefix='sparse_lm_aot_')
  # GPU: XLA's default LLVM optimisation whatever XLA_FLAGS this process has (the test suite compiles its
  # CPU programs at -O0; the kernels' registers would follow it), as ptxas runs at -O3 below.
  options = {'xla_dump_to': dump, **GPU_CODEGEN} if target.platform == 'cuda' else {}
  if kernel_cache and target.platform == 'cuda':
    options.update(xla_gpu_kernel_cache_file=kernel_cache,
                   xla_gpu_enable_llvm_module_compilation_parallelism=True)
  start = time.perf_counter()
  try:
    compiled = lowered.compile(compiler_options=options)
  except jax.errors.JaxRuntimeError as e:
    shutil.rmtree(dump, ignore_errors=True)
    return Report(False, one_line(e), time.perf_counter() - start, {}, [])
  seconds = time.perf_counter() - start
  hlo = compiled.as_text()
  try:
    kernels = (gpu_kernels(hlo, pathlib.Path(dump), target.gpu) if target.platform == 'cuda'
               else tpu_kernels(hlo))
  finally:
    shutil.rmtree(dump, ignore_errors=True)
  return Report(True, None, seconds, memory(compiled, target), kernels, bytes_accessed(compiled),
                collectives(hlo, len(target.devices)))


_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) .*\{$')
_COLLECTIVE_OPS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'ragged-all-to-all',
                   'collective-permute')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%\S+ = (.*?) ((?:' + '|'.join(_COLLECTIVE_OPS) +
                          r')(?:-start)?|while|call|conditional|fusion|async-start)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+[a-z]*)?)\[([\d,]*)\]')
_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
             'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}


def collectives(hlo_text: str, num_devices: int) -> dict:
  """The bytes each device sends in one execution's collectives, read from the optimized program: per
  operation, what a ring algorithm sends over groups of n devices (all-gather: (n-1)/n of the result;
  reduce-scatter: (n-1)/n of the operand; all-reduce: twice (n-1)/n; all-to-all: (n-1)/n; a permute:
  its operand), a loop's body times its known trip count (1 where the compiler knows none), each branch
  of a conditional once (an upper bound). `{'bytes_per_device', 'by_op': {op: bytes}, 'count'}`."""
  own, calls, current = {}, {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      own[current], calls[current] = [], []
      if line.startswith('ENTRY'):
        own['__entry__'] = current
      continue
    if current is None or ' = ' not in line:
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    shape, op, rest = match.groups()
    if op in ('while', 'call', 'conditional', 'fusion', 'async-start'):
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
      for callee in re.findall(r'(?:body|calls|to_apply|branch_computations=\{[^}]*|true_computation|'
                               r'false_computation)=?%([\w.-]+)', rest):
        calls[current].append((callee, int(trips.group(1)) if trips and op == 'while' else 1))
      for callee in re.findall(r'branch_computations=\{([^}]*)\}', rest):
        calls[current] += [(name.strip().lstrip('%'), 1) for name in callee.split(',')]
      continue
    sizes = [math.prod(int(d) for d in dims.split(',') if d) * _ITEMSIZE.get(dtype, 4)
             for dtype, dims in _ARRAY.findall(shape)]
    base = op.removesuffix('-start')
    if op.endswith('-start') and base in ('all-gather', 'reduce-scatter', 'collective-permute') \
        and len(sizes) >= 2:
      half = len(sizes) // 2
      sizes = sizes[half:] if base == 'all-gather' else sizes[:half]
    nbytes = sum(sizes)
    n = _group_size(rest, num_devices)
    share = (n - 1) / n if n > 1 else 0.0
    sent = {'all-gather': nbytes * share, 'reduce-scatter': nbytes * share, 'all-reduce': 2 * nbytes * share,
            'all-to-all': nbytes * share, 'ragged-all-to-all': nbytes * share,
            'collective-permute': float(nbytes)}[base]
    own[current].append((base, sent))
  by_op: dict[str, float] = {}
  count = 0

  def visit(name: str, times: int, depth: int = 0) -> None:
    nonlocal count
    if depth > 64 or name not in own:
      return
    for base, sent in own[name]:
      by_op[base] = by_op.get(base, 0.0) + sent * times
      count += times
    for callee, trips in calls.get(name, ()):
      visit(callee, times * trips, depth + 1)
  if '__entry__' in own:
    visit(own['__entry__'], 1)
  return {'bytes_per_device': sum(by_op.values()), 'by_op': by_op, 'count': count}


def _group_size(attributes: str, num_devices: int) -> int:
  """Devices per replica group: `[groups,n]<=[...]` (iota), `{{0,1,..},..}` (explicit) or all."""
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]', attributes)
  if iota:
    return int(iota.group(2))
  explicit = re.search(r'replica_groups=\{\{([\d,]*)\}', attributes)
  if explicit:
    return len(explicit.group(1).split(','))
  return num_devices


def bytes_accessed(compiled) -> int | None:
  """XLA's estimate of the bytes one execution moves to and from device memory (a custom call, such as a
  Pallas kernel, counts its operands and results once), or None where the backend gives no estimate."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
  return int(cost['bytes accessed']) if cost and 'bytes accessed' in cost else None


def memory(compiled, target: Target) -> dict:
  """Per-device bytes. Peak = arguments + outputs - aliased (donated) + temporaries: XLA's buffers
  live at once in the worst case, as its allocator plans them."""
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return {'argument_bytes': m.argument_size_in_bytes, 'output_bytes': m.output_size_in_bytes,
          'alias_bytes': m.alias_size_in_bytes, 'temp_bytes': m.temp_size_in_bytes,
          'peak_bytes': peak, 'device_memory_bytes': target.memory_bytes}


_TRITON_CALL = re.compile(r'custom_call_target="__gpu\$xla\.gpu\.triton".*?\bname = "([^"]+)"')
_THUNK = re.compile(r'kCustomKernel .*?\] (\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+'
                    r'shared_memory: (\d+) bytes')
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_NUMBERS = {
    'stack_bytes': re.compile(r'(\d+) bytes stack frame'),
    'spill_store_bytes': re.compile(r'(\d+) bytes spill stores'),
    'spill_load_bytes': re.compile(r'(\d+) bytes spill loads'),
    'registers': re.compile(r'Used (\d+) registers'),
}


def gpu_kernels(hlo_text: str, dump: pathlib.Path, gpu: Gpu) -> list[dict]:
  """Every Pallas (Triton) kernel of the program: launch shape and shared memory as XLA plans them,
  registers and spills as ptxas reports them."""
  calls = _TRITON_CALL.findall(hlo_text)
  launches = {}  # a name used by kernels of different shapes keeps its largest shared memory
  for path in dump.glob('*.thunk_sequence.txt'):
    for name, grid, threads, smem in _THUNK.findall(path.read_text()):
      if int(smem) >= launches.get(name, {}).get('shared_memory_bytes', -1):
        launches[name] = {'grid': _ints(grid), 'threads': _ints(threads), 'shared_memory_bytes': int(smem)}
  resources = ptxas_report(sorted(dump.glob('*.ptx')), gpu, set(calls))
  return [{'name': name, 'calls': calls.count(name), **launches.get(name, {}), **resources.get(name, {})}
          for name in sorted(set(calls))]


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(',')]


def ptxas_path() -> str:
  """The `ptxas` of the nvidia-cuda-nvcc-cu12 wheel (XLA's own choice), else one on PATH."""
  import nvidia.cuda_nvcc  # noqa: PLC0415  (optional: only GPU targets need it)
  found = [p for root in nvidia.cuda_nvcc.__path__ for p in glob.glob(os.path.join(root, 'bin', 'ptxas'))]
  return found[0] if found else shutil.which('ptxas')


def ptxas_report(ptx_files: list[pathlib.Path], gpu: Gpu, names: set[str]) -> dict[str, dict]:
  """Registers, stack and spill bytes of the entries in those of `ptx_files` that define one of `names`
  (ptxas -v at XLA's -O3; a train step dumps a file per XLA fusion, and assembling them all again took a
  third of its compile test); an entry name compiled more than once (kernels of different shapes) keeps
  the largest of each."""
  ptxas, out = ptxas_path(), {}
  for path in ptx_files:
    text = path.read_text()
    if not any(f'.entry {name}(' in text for name in names):
      continue
    run = subprocess.run([ptxas, '-v', '-O3', f'--gpu-name={gpu.ptxas_arch}', str(path), '-o', os.devnull],
                         capture_output=True, text=True, check=True)
    parts = _PTXAS_ENTRY.split(run.stderr)
    for name, text in zip(parts[1::2], parts[2::2], strict=True):
      numbers = {key: int(m.group(1)) for key, pattern in _PTXAS_NUMBERS.items()
                 if (m := pattern.search(text))}
      out[name] = {key: max(value, out.get(name, {}).get(key, 0)) for key, value in numbers.items()}
  return out


_MOSAIC_CALL = re.compile(r'^\s*%(?P<name>[\w-]+?)(?:\.\d+)? = .*custom_call_target="tpu_custom_call"')
_SCOPED = re.compile(r'"memory_space":"(\d+)","offset":"\d+","size":"(\d+)"')
_MEMORY_SPACES = {'1': 'vmem'}  # XLA TPU's memory-space colour 1 is the vector memory (layouts' S(1))


def tpu_kernels(hlo_text: str) -> list[dict]:
  """The Mosaic kernels of the program: calls of each, and the most scoped memory (VMEM) any call
  reserves, which is the resource Mosaic reports in the compiled program."""
  kernels: dict[str, dict] = {}
  for line in hlo_text.splitlines():
    if not (m := _MOSAIC_CALL.match(line)):
      continue
    k = kernels.setdefault(m['name'], {'name': m['name'], 'calls': 0})
    k['calls'] += 1
    for space, size in _SCOPED.findall(line):
      key = f'scoped_{_MEMORY_SPACES.get(space, "memory_space_" + space)}_bytes'
      k[key] = max(k.get(key, 0), int(size))
  return sorted(kernels.values(), key=lambda k: k['name'])


# ----------------------------------------------------------------------------- one kernel at a time

KERNELS = ('flash_attention', 'compressed_attention', 'block_selection', 'selected_attention',
           'token_attention', 'grouped_matmul')


def lower_kernel(kernel: str, target: Target, *, batch: int = 1, seq_len: int = 4096, q_heads: int = 8,
                 kv_heads: int = 2, head_dim: int = 128, dtype: str = 'bfloat16', selected: int = 16,
                 block_size: int = 64, cmp_block: int = 32, cmp_stride: int = 16, experts: int = 8,
                 tokens: int = 2048, segments: bool = False, **options):
  """Forward and backward of one kernel (its inputs' gradients, as training needs them; block selection
  has none) lowered for one device of `target`, with the kernel body of that platform. Attention:
  q [B, T, Hq, D], k/v [B, T, Hkv, D] (NSA's selection: `selected` blocks of `block_size` per token;
  DSA's token attention: `tokens` positions per token, the paper's top-k 2048 by default;
  compressed attention and block selection: the compressed keys of blocks of `cmp_block` at stride
  `cmp_stride`); grouped matmul: [B*T, Hq*D] rows over `experts` groups of [Hq*D, Hkv*D] weights.
  `segments`: segment ids (packed documents) as one more input, for flash attention, compressed
  attention and block selection. `options` go to the kernel."""
  if kernel not in KERNELS:
    raise ValueError(f'kernel={kernel!r} is not one of {KERNELS}')
  one = jax.sharding.SingleDeviceSharding(target.devices[0])
  dt = jnp.dtype(dtype)

  def arg(shape, dtype=dt):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=one)

  q = arg((batch, seq_len, q_heads, head_dim))
  kv = arg((batch, seq_len, kv_heads, head_dim))
  compressed = arg((batch, (seq_len - cmp_block) // cmp_stride + 1, kv_heads, head_dim))
  nsa_rules = dict(cmp_block=cmp_block, cmp_stride=cmp_stride)
  ids = arg((batch, seq_len), jnp.int32)
  if segments and kernel not in ('flash_attention', 'compressed_attention', 'block_selection'):
    raise ValueError(f'segments=True: {kernel} takes no segment ids (it attends to the keys it is listed)')
  if kernel == 'block_selection':
    fn = functools.partial(block_selection, **nsa_rules, sel_block=block_size, num_selected=selected,
                           **options)
    lse = arg((batch, q_heads, seq_len), jnp.float32)
    if segments:
      return jax.jit(lambda q, ck, lse, seg: fn(q, ck, lse, segment_ids=seg)).trace(q, compressed, lse,
                                                                                    ids).lower()
    return jax.jit(fn).trace(q, compressed, lse).lower()
  if kernel == 'grouped_matmul':
    width, out_width = q_heads * head_dim, kv_heads * head_dim
    args = (arg((batch * seq_len, width)), arg((experts, width, out_width)))
    sizes = jnp.full((experts,), batch * seq_len // experts, jnp.int32)
    fn = lambda lhs, rhs: grouped_matmul(lhs, rhs, sizes, **options)  # noqa: E731
  elif kernel == 'compressed_attention' and segments:
    args = (q, compressed, compressed, ids)
    fn = lambda q, k, v, seg: compressed_attention(q, k, v, **nsa_rules, segment_ids=seg, **options)[0]  # noqa: E731
  elif kernel == 'compressed_attention':
    args = (q, compressed, compressed)
    fn = lambda *a: compressed_attention(*a, **nsa_rules, **options)[0]  # noqa: E731
  elif kernel == 'flash_attention' and segments:
    args = (q, kv, kv, ids)
    fn = lambda q, k, v, seg: flash_attention(q, k, v, segment_ids=seg, **options)  # noqa: E731
  elif kernel == 'flash_attention':
    args = (q, kv, kv)
    fn = functools.partial(flash_attention, **options)
  elif kernel == 'token_attention':
    args = (q, kv, kv, arg((batch, seq_len, kv_heads, tokens), jnp.int32))
    fn = functools.partial(token_attention, **options)
  else:
    args = (q, kv, kv, arg((batch, seq_len, kv_heads, selected), jnp.int32))
    fn = functools.partial(selected_attention, block_size=block_size, **options)
  floats = tuple(range(2 if kernel == 'grouped_matmul' else 3))
  loss = lambda *a: fn(*a).astype(jnp.float32).sum()  # noqa: E731
  return jax.jit(jax.grad(loss, argnums=floats)).trace(*args).lower()
