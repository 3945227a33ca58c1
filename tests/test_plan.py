"""The plan search (`python -m sparse_lm.compile --fit`, sparse_lm/plan.py) and the collectives read from
a compiled program (`aot.collectives`). The search runs here against a stand-in compiler whose memory and
traffic follow known rules, so what it picks can be checked exactly; the compile tier runs it for real
(tests/test_compile.py)."""

import math

import pytest

from sparse_lm import aot, checks, ladder, plan
from sparse_lm.errors import ConfigError

# A made-up optimized program: the entry calls a loop of 4 trips whose body gathers a bf16 [4, 8] from
# groups of 2 (iota groups), all-reduces a f32 [16] over explicit groups of 4, and scatters; a permute
# runs once outside.
HLO = """HloModule jit_step

%body.1 (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %ag = (bf16[2,8]{1,0}, bf16[4,8]{1,0}) all-gather-start(%x), channel_id=1, replica_groups=[4,2]<=[8]
  %agd = bf16[4,8]{1,0} all-gather-done(%ag)
  %ar = f32[16]{0} all-reduce-start(%y), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %rs = ((f32[8,4]{1,0}), f32[2,4]{1,0}) reduce-scatter-start(%z), channel_id=3, replica_groups=[2,4]<=[8]
  ROOT %t = (s32[], f32[16]) tuple(%i, %ar)
}

%cond.1 (p: (s32[], f32[16])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %w = (s32[], f32[16]) while(%init), body=%body.1, backend_config={"known_trip_count":{"n":"4"}}
  %cp = (f32[10]{0}, f32[10]{0}) collective-permute-start(%a), channel_id=4, source_target_pairs={{0,1},{1,0}}
  ROOT %r = f32[16] get-tuple-element(%w), index=1
}
"""


def test_collectives_counts_each_loop_trip_and_group():
  got = aot.collectives(HLO, num_devices=8)
  gather = 4 * 8 * 2 * (1 / 2)  # the gathered bf16 [4, 8], half of it from the other device
  reduce = 2 * 16 * 4 * (3 / 4)  # f32 [16], twice 3/4 of it in a ring of 4
  scatter = 8 * 4 * 4 * (3 / 4)  # the f32 [8, 4] operand, 3/4 of it sent
  assert got['by_op'] == pytest.approx({'all-gather': 4 * gather, 'all-reduce': 4 * reduce,
                                        'reduce-scatter': 4 * scatter, 'collective-permute': 40.0})
  assert got['bytes_per_device'] == pytest.approx(4 * (gather + reduce + scatter) + 40)
  assert got['count'] == 3 * 4 + 1


def test_candidate_plans_split_heads_experts_and_rows_evenly():
  dense = ladder.dense_config('100m')  # 12 query heads, 4 kv heads, batch 128
  plans = plan.candidate_plans(dense, 8)
  assert {p.mesh[2] for p in plans} == {1, 2, 4}  # tensor: divides the 4 kv heads
  assert {p.mesh[3] for p in plans} == {1}  # no experts to split
  assert {p.mesh[4] for p in plans} == {1, 2, 4, 8}  # dense attention runs with its sequences split
  assert {p.mesh[4] for p in plan.candidate_plans(ladder.nsa_config('100m'), 8)} == {1, 2, 4, 8}
  mosa = ladder.variant_config('100m', 'mosa_causal')
  assert {p.mesh[4] for p in plan.candidate_plans(mosa, 8)} == {1, 2, 4, 8}  # MoSA's slots split by head
  assert {p.recompute for p in plans} == set(plan.RECOMPUTE)
  for p in plans:
    assert math.prod(p.mesh) == 8
    checks.check_train(p.apply(dense), 8, 1)
  moe = ladder.moe_config('100m')
  assert {p.mesh[3] for p in plan.candidate_plans(moe, 8)} > {1}
  assert all(moe.model.moe.num_experts % p.mesh[3] == 0 for p in plan.candidate_plans(moe, 8))


def test_overrides_round_trip_through_the_config():
  p = plan.Plan((2, 2, 2, 1, 1), 'attention', 4)
  c = p.apply(ladder.dense_config('100m'))
  assert plan.shipped_plan(c, 8) == p
  assert '--config.model.remat_attention=True' in p.overrides()
  assert '--config.train.grad_accum_steps=4' in p.overrides()


class FakeCompiler:
  """Peak per device = layers * (activations / accumulation * recompute factor) + weights / fsdp, traffic
  = bytes by the mesh; counts its calls. Activations dominate, so fitting needs accumulation or
  recomputation; fsdp trims the weights but costs traffic."""
  RECOMPUTE_FACTOR = {'none': 1.0, 'attention': 0.6, 'block': 0.2}

  def __init__(self, limit):
    self.limit, self.calls = limit, []

  def __call__(self, c):
    p = plan.shipped_plan(c, 8)
    self.calls.append((p, c.model.num_layers))
    d = p.mesh_dict()
    peak = c.model.num_layers * (10.0 / p.grad_accum * self.RECOMPUTE_FACTOR[p.recompute]) + 40.0 / d['fsdp']
    sent = 1e9 * (d['fsdp'] - 1) + 5e9 * (d['tensor'] - 1)
    gib = peak * aot.GIB
    return {'compiled': True, 'error': None, 'compile_seconds': 0.0, 'fits': gib <= self.limit,
            'memory_per_device': {'peak_bytes': gib}, 'collectives': {'bytes_per_device': sent}}


def _target():
  return aot.get_target('h100x8')


def test_search_extrapolates_prunes_and_confirms_the_cheapest_plan_that_fits():
  config = ladder.dense_config('100m')  # 16 layers
  limit = 100 * aot.GIB
  fake = FakeCompiler(limit)
  found = plan.search(config, _target(), fake, limit_bytes=limit, max_compiles=40, log=lambda _: None)
  tried = found['tried']
  # Two reduced depths per tried plan (1 and 2 layers), then the full depth of the one chosen.
  assert [layers for _, layers in fake.calls[:-1]] == [1, 2] * len(tried)
  assert fake.calls[-1][1] == 16
  for row in tried:  # the linear rule is extrapolated exactly
    p = next(q for q, _ in fake.calls if q.describe() == row['plan'])
    want = 16 * (10.0 / p.grad_accum * FakeCompiler.RECOMPUTE_FACTOR[p.recompute]) + 40.0 / p.mesh[1]
    assert row['peak_bytes'] == pytest.approx(want * aot.GIB)
  chosen = next(r for r in tried if r['plan'] == found['plan'])
  assert chosen['fits'] and found['report']['fits']
  assert all(r['estimated_seconds'] >= chosen['estimated_seconds'] for r in tried if r['fits'])
  # Data parallel (no traffic here) with recomputation and accumulation: 16 * 10 / 2 * 0.6 + 40 fits.
  assert found['plan'] == 'data=8 recompute=none grad_accum=4'
  compiled = [p for p, layers in fake.calls if layers == 1]
  assert len(compiled) == len(set(compiled))  # no plan compiled twice


def test_search_that_finds_nothing_says_what_would_fit_in_one_line():
  config = ladder.dense_config('100m')
  limit = 1 * aot.GIB
  with pytest.raises(ConfigError, match=r'^no plan fits h100x8 in \d+ compiles: the least memory was .* try '
                     r'about \d+ devices') as error:
    plan.search(config, _target(), FakeCompiler(limit), limit_bytes=limit, max_compiles=6, log=lambda _: None)
  assert '\n' not in str(error.value)


def test_a_plan_that_fails_is_not_followed_by_plans_that_save_less():
  config = ladder.dense_config('100m')
  limit = 100 * aot.GIB
  fake = FakeCompiler(limit)
  plan.search(config, _target(), fake, limit_bytes=limit, max_compiles=40, log=lambda _: None)
  seen = [p for p, layers in fake.calls if layers == 1]
  for i, p in enumerate(seen):
    failed_before = [q for q in seen[:i] if _peak(q, 16) > 100]
    fitted_before = [q for q in seen[:i] if _peak(q, 16) <= 100]
    assert not any(p.saves_no_more_than(q) for q in failed_before), p
    assert not any(q.saves_no_more_than(p) for q in fitted_before), p


def _peak(p, layers):
  return layers * (10.0 / p.grad_accum * FakeCompiler.RECOMPUTE_FACTOR[p.recompute]) + 40.0 / p.mesh[1]
