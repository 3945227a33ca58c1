"""The base config every experiment starts from, and the checks run on it before anything compiles.

Every key a run can set lives here with its default, or in the variant that owns it (`defaults()`);
`configs/*.py` only override. `validate` turns a
bad value into one `ConfigError` line naming the key and what is allowed.
"""

import ml_collections

from sparse_lm import attention, mlp
from sparse_lm.errors import ConfigError

__all__ = ['ConfigError', 'base_config']


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.attention = 'dense'  # a name in sparse_lm.attention.REGISTRY
  c.model.mlp = 'dense'  # a name in sparse_lm.mlp.REGISTRY
  c.model.kernel = 'xla'  # 'xla' (pure-JAX reference path) or 'pallas'
  c.model.num_layers = 5
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.mlp_dim = 384  # SwiGLU hidden width
  c.model.vocab_size = 0  # 0: the tokenizer's
  c.model.tie_embeddings = True
  c.model.vocab_multiple = 64  # the embedding table is padded to a multiple of this
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-6
  c.model.dtype = 'float32'  # compute dtype; 'bfloat16' on accelerators
  c.model.param_dtype = 'float32'
  c.model.remat = False  # recompute each block in the backward pass to save memory
  c.model.remat_attention = False  # recompute only the attention sublayers (the block's MLP keeps its own)
  # Each registered attention and MLP variant adds its own keys (`defaults()`: model.window, model.nsa,
  # model.mosa, model.routing, model.moe), documented in the variant's file.
  for variant in (*attention.REGISTRY.values(), *mlp.REGISTRY.values()):
    for key, value in variant.defaults().items():
      c.model[key] = value

  c.data = ml_collections.ConfigDict()
  # stdlib | text:GLOB | jsonl:GLOB[:FIELD] | parquet:GLOB[:COLUMN] | bin:GLOB | tfds:NAME[:CONFIG] | mqar
  # | passkey (sparse_lm/data.py)
  c.data.source = 'stdlib'
  # WEIGHT=SOURCE,... (e.g. 0.7=tokens:/data/web,0.3=tokens:/data/code): windows drawn from the sources by
  # weight instead of data.source, with tokens drawn and eval_loss reported per source; '' for none.
  c.data.mixture = ''
  c.data.seq_len = 256
  # byte | sentencepiece:VOCAB (trained on train) | sentencepiece:PATH.model | hf:PATH (a tokenizer.json)
  # | ids:VOCAB (sparse_lm/tokenizer.py)
  c.data.tokenizer = 'byte'
  c.data.validation_fraction = 0.02  # of documents, for sources without a validation split
  c.data.shuffle_buffer = 256  # packed sequences shuffled in a window of this many, per shard
  # How documents become rows of seq_len + 1 tokens (sparse_lm/data.py `_pack`): 'segments' (cut from the
  # concatenation, each document a segment that attention and RoPE positions keep to; the default: no
  # token attends to an unrelated document, and none is spent on padding), 'concat' (the same cut,
  # attention crossing documents; what `bin:` shards, which have no boundaries, need), 'first_fit' /
  # 'best_fit' (whole documents packed into rows with padding by grain's packers, over `packing_bins`
  # rows at a time; a longer document is truncated).
  c.data.packing = 'segments'
  c.data.packing_bins = 64
  # grain threads reading documents ahead, per shard. 0 reads them in the training loop's thread: right for
  # the in-memory sources, where threads only contend for the GIL; a tfds source on a slow disk wants some.
  c.data.read_threads = 0
  # Virtual shards of the train stream (sparse_lm/data.py): they, not the hosts, fix the batches, so a
  # run gives the same data on any process count that divides them. 0: the largest power of two
  # dividing train.batch_size, at most 64.
  c.data.num_shards = 0
  c.data.tfds_split_train = 'train'
  c.data.tfds_split_eval = 'validation'
  c.data.tfds_text_key = 'text'
  # Where prepared TFDS datasets are; '' is TFDS's own ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
  c.data.tfds_data_dir = ''
  c.data.tfds_download = False  # download and prepare a missing TFDS dataset at run time (else one line)
  # hf:PATH_OR_NAME reads local data only, unless this lets the datasets library reach the Hub. The
  # tfds_split_* and tfds_text_key keys above name its splits and text column too.
  c.data.hf_download = False
  # Stream a Hub dataset (or local data files) row by row instead of downloading or converting it whole
  # first: for corpora larger than the disk, or to start at once. Resumes exactly (the library's state).
  c.data.hf_streaming = False

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global, in sequences
  c.train.grad_accum_steps = 1
  c.train.steps = 600
  c.train.learning_rate = 3e-3
  c.train.schedule = 'cosine'  # 'cosine' or 'wsd' (warmup-stable-decay)
  c.train.warmup_steps = 50
  c.train.decay_fraction = 0.2  # wsd: the final fraction of steps that decays
  c.train.min_lr_ratio = 0.1
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0
  c.train.seed = 0
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.log_every = 10
  # A non-finite loss or gradient norm: 'stop' (exit non-zero, never saving that state) or 'skip' (leave
  # the state as it was, count it in the metric skipped_steps, stop after max_skipped_steps in a row).
  c.train.on_nonfinite = 'stop'
  c.train.max_skipped_steps = 10
  # Evaluation tasks (sparse_lm.evaluate) run at every eval_every beside eval_loss, comma-separated:
  # position_loss, passkey, niah, ruler (its single-needle tasks), mqar; at data.seq_len, on
  # eval_task_samples examples (documents for position_loss), logged as metrics.
  c.train.eval_tasks = ''
  c.train.eval_task_samples = 4

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1
  c.mesh.context = 1  # devices each sequence is split over (context parallelism, sparse_lm/context.py)
  # Of the data and fsdp sizes above, how many ways each is split *across* granules (TPU slices, or
  # hosts where devices have no slice): the slow network (DCN) carries only these axes' traffic, and
  # tensor and expert stay within a granule. 1 and 1: one granule, or jax.make_mesh's default order,
  # which already puts whole hosts along the outermost axes.
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  return c
