"""Bad configs fail before compilation with one line naming the key."""

import importlib.util
import math

import pytest

from sparse_lm import checks, sharding
from sparse_lm.config import ConfigError
from tests.conftest import CORPUS_FILE, REPO, tiny_config

CASES = [
    ('model.attention', lambda c: c.model.update(attention='bogus')),
    ('model.mlp', lambda c: c.model.update(mlp='bogus')),
    ('model.kernel', lambda c: c.model.update(kernel='triton')),
    ('model.num_heads', lambda c: c.model.update(num_heads=3, head_dim=21, d_model=63)),
    ('model.d_model', lambda c: c.model.update(d_model=100)),
    ('model.window', lambda c: c.model.update(attention='sliding_window', window=0)),
    ('mesh', lambda c: c.mesh.update(data=2, fsdp=1)),
    ('mesh', lambda c: c.mesh.update(data=-1, fsdp=-1)),
    ('train.batch_size', lambda c: c.train.update(batch_size=9, grad_accum_steps=2)),
    ('train.schedule', lambda c: c.train.update(schedule='linear')),
    ('data.source', lambda c: c.data.update(source='text:/nonexistent/*.txt')),
    ('data.source', lambda c: c.data.update(source='ftp:corpus')),
    ('data.seq_len', lambda c: c.data.update(seq_len=10_000_000)),
    ('data.tokenizer', lambda c: c.data.update(tokenizer='wordpiece')),
    ('data.read_threads', lambda c: c.data.update(read_threads=-1)),
    # Documents start on NSA's selection grid (4 tokens in the tiny config), so rows hold whole blocks.
    ('data.seq_len', lambda c: (c.model.update(attention='nsa', nsa={'cmp_block': 4, 'cmp_stride': 2,
                                                                      'sel_block': 4, 'num_selected': 3,
                                                                      'window': 5}),
                                c.data.update(packing='segments', seq_len=30))),
]


@pytest.mark.parametrize('key,mutate', CASES, ids=[f'{k}-{i}' for i, (k, _) in enumerate(CASES)])
def test_bad_value_raises_one_line_naming_the_key(key, mutate):
  c = tiny_config()
  c.data.source = f'text:{CORPUS_FILE}'
  mutate(c)
  with pytest.raises(ConfigError) as error:
    checks.check_config(c, num_devices=1)
  message = str(error.value)
  assert key in message and '\n' not in message


def test_good_config_passes():
  c = tiny_config()
  c.data.source = f'text:{CORPUS_FILE}'
  checks.check_config(c, num_devices=1)


@pytest.mark.parametrize('path', sorted((REPO / 'configs').glob('*.py')), ids=lambda p: p.stem)
def test_every_shipped_config_passes_the_checks(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  # The model and training checks only: the accelerator rungs' eval batches (256 x 2048 tokens) want
  # more validation text than the embedded corpus has, which the data check rightly reports.
  checks.check_model(config.model)
  # A config whose plan fixes mesh axes (moe_1b: fsdp 4) is sized for the 8 devices it was planned on.
  fixed = math.prod(size for axis, size in config.mesh.items() if axis in sharding.MESH_AXES and size > 1)
  checks.check_train(config, num_devices=8 if fixed > 1 else 1, process_count=1)
