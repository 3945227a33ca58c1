"""`check_config`: every reason a config cannot run, found before anything compiles.

Each failure is one `ConfigError` line naming the key, the value and what is allowed.
"""

import ml_collections

from sparse_lm import attention, data, mlp, sharding, tokenizer
from sparse_lm.errors import ConfigError, require_choice, require_positive

KERNELS = ('xla', 'pallas')
DTYPES = ('float32', 'bfloat16')
SCHEDULES = ('cosine', 'wsd')
NONFINITE = ('stop', 'skip')  # train.on_nonfinite


def check_model(m: ml_collections.ConfigDict) -> None:
  require_choice('model.attention', m.attention, attention.REGISTRY)
  require_choice('model.mlp', m.mlp, mlp.REGISTRY)
  require_choice('model.kernel', m.kernel, KERNELS)
  require_choice('model.dtype', m.dtype, DTYPES)
  require_choice('model.param_dtype', m.param_dtype, DTYPES)
  require_positive(m, 'model', ('num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
                         'vocab_multiple'))
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f'model.num_heads={m.num_heads} is not a multiple of '
                      f'model.num_kv_heads={m.num_kv_heads} (grouped-query attention needs it)')
  if attention.REGISTRY[m.attention].heads_span_width and m.num_heads * m.head_dim != m.d_model:
    raise ConfigError(f'model.d_model={m.d_model} must equal model.num_heads * model.head_dim = '
                      f'{m.num_heads} * {m.head_dim} = {m.num_heads * m.head_dim}')
  if m.head_dim % 2:
    raise ConfigError(f'model.head_dim={m.head_dim} must be even (rotary embeddings rotate pairs)')
  attention.REGISTRY[m.attention].check_config(m)
  mlp.REGISTRY[m.mlp].check_config(m)


def check_train(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  t = config.train
  require_choice('train.schedule', t.schedule, SCHEDULES)
  require_choice('train.on_nonfinite', t.on_nonfinite, NONFINITE)
  require_positive(t, 'train', ('batch_size', 'grad_accum_steps', 'steps', 'eval_every', 'eval_batches',
                         'log_every', 'max_skipped_steps'))
  require_positive(config.checkpoint, 'checkpoint', ('every_steps', 'keep'))
  require_positive(config.data, 'data', ('seq_len',))
  if not 0 <= t.warmup_steps < t.steps:
    raise ConfigError(f'train.warmup_steps={t.warmup_steps} must be in [0, train.steps={t.steps})')
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices), strict=True))
  rows = shape['data'] * shape['fsdp']
  micro, rest = divmod(t.batch_size, t.grad_accum_steps)
  if rest or micro % rows or t.batch_size % process_count:
    raise ConfigError(
        f'train.batch_size={t.batch_size} must split into train.grad_accum_steps={t.grad_accum_steps} '
        f'microbatches each divisible by mesh.data * mesh.fsdp = {rows}, and over {process_count} hosts')
  if config.model.mlp == 'moe':
    _check_expert_parallel(config, shape['expert'], micro // rows)
  _check_packing(config)
  _check_context(config, shape['context'])
  _check_eval_tasks(config, process_count)


IN_TRAINING = ('position_loss', 'passkey', 'niah', 'ruler', 'mqar')


def _check_eval_tasks(config: ml_collections.ConfigDict, process_count: int) -> None:
  """`train.eval_tasks`: known fast tasks, on one process (they run on the variables gathered to it)."""
  names = [n.strip() for n in config.train.eval_tasks.split(',') if n.strip()]
  for name in names:
    if name not in IN_TRAINING:
      raise ConfigError(f'train.eval_tasks={config.train.eval_tasks!r}: {name!r} is not one of '
                        f'{", ".join(IN_TRAINING)}')
  if names and process_count > 1:
    raise ConfigError(f'train.eval_tasks={config.train.eval_tasks!r} runs on one process, and this run has '
                      f'{process_count}; evaluate its checkpoints with python -m sparse_lm.evaluate instead')
  require_positive(config.train, 'train', ('eval_task_samples',))


def _check_context(config: ml_collections.ConfigDict, devices: int) -> None:
  """Context parallelism (sparse_lm/context.py) splits each sequence into 2 x mesh.context chunks and
  needs every layer's attention to run split."""
  if devices == 1:
    return
  m = config.model
  if not attention.every_layer(m, 'context_parallel'):
    able = ', '.join(attention.having('context_parallel'))
    raise ConfigError(f'mesh.context={devices}: model.attention={m.attention!r} does not run with its '
                      f'sequences split yet (those that do: {able}); use mesh.context=1')
  if config.data.seq_len % (2 * devices):
    raise ConfigError(f'mesh.context={devices} cuts each sequence into {2 * devices} equal chunks (an early '
                      f'and a late one a device), so data.seq_len={config.data.seq_len} must be a multiple '
                      f'of {2 * devices}')
  align = attention.context_alignment(m)
  if (config.data.seq_len // (2 * devices)) % align:
    raise ConfigError(f'mesh.context={devices} with model.attention={m.attention!r} needs chunks of a '
                      f'multiple of {align} tokens, so data.seq_len={config.data.seq_len} must be a '
                      f'multiple of {2 * devices * align}')


def _check_packing(config: ml_collections.ConfigDict) -> None:
  """Document packing needs every layer's attention to keep documents apart."""
  if config.data.packing == 'concat':
    return
  m = config.model
  if not attention.every_layer(m, 'segments'):
    raise ConfigError(f'data.packing={config.data.packing!r} needs attention that keeps documents apart; '
                      f'model.attention={m.attention!r} does not yet (those that do: '
                      f'{", ".join(attention.having("segments"))}); use data.packing=concat')
  align = attention.document_alignment(m)
  if config.data.seq_len % align:
    raise ConfigError(f'data.packing={config.data.packing!r} with model.attention={m.attention!r} starts '
                      f'each document on its block grid of {align} tokens, so data.seq_len='
                      f'{config.data.seq_len} must be a multiple of {align}')


def _check_expert_parallel(config: ml_collections.ConfigDict, experts_axis: int, rows: int) -> None:
  """Each device of an expert group owns E / mesh.expert experts and routes 1/mesh.expert of the
  rows its group shares (sparse_lm/mlp/moe.py)."""
  num_experts = config.model.moe.num_experts
  if num_experts % experts_axis:
    raise ConfigError(f'model.moe.num_experts={num_experts} must be a multiple of mesh.expert={experts_axis}')
  if rows * config.data.seq_len % experts_axis:
    raise ConfigError(f'mesh.expert={experts_axis} must divide the tokens of each device\'s microbatch '
                      f'({rows} rows x data.seq_len={config.data.seq_len})')


def check_config(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1) -> None:
  check_model(config.model)
  check_train(config, num_devices, process_count)
  tokenizer.vocab_size_for(config)
  data.check_source(config)
  data.check_shards(config, process_count)
