"""Logical-axis rules and mesh construction."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from sparse_lm import sharding
from sparse_lm.config import ConfigError
from tests.conftest import tiny_config


def test_mesh_shape_resolves_the_rest_and_rejects_mismatches():
  mesh = tiny_config().mesh
  mesh.update(data=-1, fsdp=4, tensor=2)
  assert sharding.mesh_shape(mesh, 16) == (2, 4, 2, 1, 1)  # data, fsdp, tensor, expert, context
  with pytest.raises(ConfigError, match='mesh'):
    sharding.mesh_shape(mesh, 12)
  mesh.update(data=3)
  with pytest.raises(ConfigError, match='multiply to 24 but there are 8 devices'):
    sharding.mesh_shape(mesh, 8)


class FakeMesh:
  shape = {'data': 2, 'fsdp': 4, 'tensor': 2, 'expert': 1, 'context': 1}


def test_rules_split_weights_and_replicate_what_does_not_divide():
  mesh = FakeMesh()
  assert sharding.logical_to_spec(('embed', 'q_heads', 'head_dim'), (64, 4, 16), mesh) == \
      PartitionSpec('fsdp', 'tensor', None)
  assert sharding.logical_to_spec(('batch', 'length'), (16, 8), mesh) == \
      PartitionSpec(('data', 'fsdp'), None)
  mesh.shape = {**FakeMesh.shape, 'context': 4}  # a sequence's tokens split over the context axis
  assert sharding.logical_to_spec(('batch', 'length', 'act_embed'), (16, 8, 64), mesh) == \
      PartitionSpec(('data', 'fsdp'), 'context', None)
  # 3 kv heads cannot split 2 ways, so that dimension stays whole on every device.
  assert sharding.logical_to_spec(('embed', 'kv_heads', 'head_dim'), (64, 3, 16), mesh) == \
      PartitionSpec('fsdp', None, None)


def test_constrain_is_a_no_op_without_a_mesh():
  x = np.ones((2, 3), np.float32)
  assert sharding.constrain(jax.numpy.asarray(x), ('batch', 'length')).shape == (2, 3)
