"""Scaling-law fits on synthetic runs from a known law, the frontier multiplier, and the sweep commands.

Noise is fresh every run; the seed is in every failure message so a failure can be replayed.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
from matplotlib.backends.backend_agg import FigureCanvasAgg

from sparse_lm import checks, flops, scaling, sweep
from tests.conftest import REPO

TRUE = scaling.Law(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
BUDGETS = np.geomspace(1e18, 1e22, 5)


def isoflop_runs(rng, noise, budgets=BUDGETS, sizes=9, law=TRUE):
  """Per budget, sizes from 1/8 to 8x the law's optimum at C = 6ND, losses with multiplicative noise."""
  n_opt_C, _ = law.allocation(budgets)
  n_CS = n_opt_C[:, None] * np.geomspace(1 / 8, 8, sizes)
  c_CS = np.broadcast_to(budgets[:, None], n_CS.shape)
  d_CS = c_CS / (6 * n_CS)
  loss_CS = law.loss(n_CS, d_CS) * np.exp(rng.normal(0, noise, n_CS.shape))
  return n_CS.ravel(), d_CS.ravel(), loss_CS.ravel(), c_CS.ravel()


def fresh_rng():
  seed = int(np.random.SeedSequence().entropy % 2**32)
  return seed, np.random.default_rng(seed)


def test_huber_gradient_matches_finite_differences():
  seed, rng = fresh_rng()
  n, d, loss, _ = isoflop_runs(rng, noise=0.01)
  args = (np.log(n) - np.log(n).mean(), np.log(d) - np.log(d).mean(), np.log(loss))
  theta = np.array([1.0, 1.5, 0.5, 0.3, 0.3]) + rng.normal(0, 0.05, 5)
  err = scipy.optimize.check_grad(lambda t: scaling.huber_objective(t, *args)[0],
                                  lambda t: scaling.huber_objective(t, *args)[1], theta, epsilon=1e-7)
  assert err < 1e-3 * np.linalg.norm(scaling.huber_objective(theta, *args)[1]), seed


def test_approach3_recovers_known_constants():
  seed, rng = fresh_rng()
  n, d, loss, _ = isoflop_runs(rng, noise=0.002)
  law, _ = scaling.fit_law(n, d, loss, inits_GP=scaling.init_grid('small'))
  assert abs(law.alpha - TRUE.alpha) < 0.03, (seed, law)
  assert abs(law.beta - TRUE.beta) < 0.03, (seed, law)
  assert abs(law.E - TRUE.E) < 0.05, (seed, law)
  # A and B trade off against alpha and beta, so they are held to a looser tolerance.
  assert law.A == pytest.approx(TRUE.A, rel=0.25) and law.B == pytest.approx(TRUE.B, rel=0.25), (seed, law)


def test_bootstrap_intervals_cover_the_fit():
  seed, rng = fresh_rng()
  n, d, loss, _ = isoflop_runs(rng, noise=0.002)
  law, _ = scaling.fit_law(n, d, loss, inits_GP=scaling.init_grid('small'))
  laws = scaling.bootstrap_laws(n, d, loss, start=law, count=4, seed=seed, grid='small', starts=2)
  lo, hi = scaling.percentile_interval([b.alpha for b in laws])
  assert lo <= hi and lo - 0.02 < law.alpha < hi + 0.02, (seed, law, lo, hi)


def test_approach2_recovers_known_exponents():
  seed, rng = fresh_rng()
  n, _, loss, c = isoflop_runs(rng, noise=0.001)
  fit = scaling.approach2(n, loss, scaling.budget_groups(c), scaling.FlopsModel())
  a = TRUE.beta / (TRUE.alpha + TRUE.beta)
  assert len(fit['budgets']) == len(BUDGETS), seed
  assert fit['a'] == pytest.approx(a, abs=0.02), (seed, fit['a'])
  assert fit['b'] == pytest.approx(1 - a, abs=0.02), (seed, fit['b'])


def test_approach2_skips_a_budget_whose_optimum_lies_outside_its_sizes():
  logn = np.log([1e5, 2e5, 4e5, 8e5])
  assert scaling.isoflop_minimum(logn, np.array([2.0, 2.1, 2.3, 2.6])) is None  # best at the edge
  found = scaling.isoflop_minimum(logn, np.array([2.2, 2.0, 2.05, 2.3]))
  assert found is not None and logn[1] < found[1] < logn[2]


@pytest.mark.parametrize('fpt', [scaling.FlopsModel(), scaling.FlopsModel(k=9.0, gamma=0.95)])
def test_frontier_is_the_minimum_over_sizes(fpt):
  c = 1e20
  n_S = np.geomspace(1e6, 1e12, 200_001)
  brute = TRUE.loss(n_S, c / fpt(n_S)).min()
  assert scaling.frontier_loss(TRUE, c, fpt) == pytest.approx(brute, rel=1e-9)


@pytest.mark.parametrize('fpt', [scaling.FlopsModel(), scaling.FlopsModel(k=9.0, gamma=0.95)])
def test_multiplier_on_the_frontier_is_one_and_twice_the_compute_is_two(fpt):
  c = 3e19
  n, d = scaling.frontier_allocation(TRUE, c, fpt)
  assert scaling.compute_multiplier(TRUE, c, float(TRUE.loss(n, d)), fpt) == pytest.approx(1, rel=1e-9)
  loss_2c = float(scaling.frontier_loss(TRUE, 2 * c, fpt))
  assert scaling.compute_multiplier(TRUE, c, loss_2c, fpt) == pytest.approx(2, rel=1e-9)
  assert scaling.compute_multiplier(TRUE, c, TRUE.E - 0.01, fpt) == np.inf


def test_approach3_allocation_is_the_6nd_frontier():
  n, d = TRUE.allocation(1e21)
  assert 6 * n * d == pytest.approx(1e21)
  assert (n, d) == pytest.approx(scaling.frontier_allocation(TRUE, 1e21, scaling.FlopsModel()))


def test_fit_command_prints_law_and_writes_plots(tmp_path):
  seed, rng = fresh_rng()
  n, d, loss, c = isoflop_runs(rng, noise=0.002, budgets=BUDGETS[:3], sizes=5)
  runs = [dict(N=a, D=b, loss=e, C=f, budget=f) for a, b, e, f in zip(n, d, loss, c, strict=True)]
  top_c = float(BUDGETS[2])
  on_frontier = float(scaling.frontier_loss(TRUE, top_c))
  runs += [dict(name='nsa_top', variant='nsa', N=1e9, D=top_c / 6e9, C=top_c, loss=on_frontier),
           dict(name='magic', variant='moe', N=1e9, D=top_c / 6e9, C=top_c, loss=1.0)]
  path = tmp_path / 'runs.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in runs))
  out = subprocess.run([sys.executable, '-m', 'sparse_lm.scaling', 'fit', str(path), f'--out={tmp_path}',
                        '--grid=small', '--bootstrap=4', '--starts=4', f'--seed={seed}'],
                       cwd=REPO, capture_output=True, text=True, check=True).stdout
  result = json.loads(out)
  assert {'E', 'A', 'B', 'alpha', 'beta', 'intervals', 'allocation', 'approach2'} <= result.keys()
  assert abs(result['alpha'] - TRUE.alpha) < 0.05, (seed, result)
  assert result['approach2']['intervals']['a'][0] <= result['approach2']['intervals']['a'][1]
  multipliers = {v['name']: v['multiplier'] for v in result['variants']}
  assert multipliers['nsa_top'] == pytest.approx(1, abs=0.15), (seed, result['variants'])
  assert multipliers['magic'] == 'inf'
  assert all((tmp_path / f).stat().st_size > 0 for f in ('isoflops.png', 'optimal.png', 'frontier.png'))


_GOOD = [dict(N=n, D=d, loss=2.0 + 100 / n**0.3 + 300 / d**0.3) for n in (1e6, 3e6, 1e7) for d in (2e7, 6e7)]


def _lines(*records) -> str:
  return ''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records)


# Each row: the file's text and a pattern its one line must match (line numbers count from 1).
BAD_RUNS = [
    ('', r'0 dense runs .* at least 6'),
    (_lines(*_GOOD[:5], dict(N=1e7, D=6e7, loss='high')), r'runs.jsonl:6: loss=.high. must be a finite'),
    (_lines(*_GOOD[:5], dict(N=1e7, loss=3.0)), r"runs.jsonl:6: no 'D'"),
    (_lines(*_GOOD[:5], dict(N=1e7, D=6e7, loss=None)), r'runs.jsonl:6: loss=None must be'),
    (_lines(*_GOOD[:5], '{"N": 1e7, "D": 6e7, "loss": NaN}'), r'runs.jsonl:6: loss=nan must be'),
    (_lines(*_GOOD[:5], dict(N=1e7, D=6e7, loss=0)), r'runs.jsonl:6: loss=0 must be'),
    (_lines(*_GOOD[:2], '{"N": 1e7, "D": 6e7, "loss": 3.0'), r'runs.jsonl:3: not JSON'),
    (_lines(*_GOOD[:2], '[1, 2]'), r'runs.jsonl:3: expected a JSON object'),
    (_lines(*[_GOOD[0]] * 10), r'runs.jsonl:2: the same record as line 1'),
    (_lines(*_GOOD, *_GOOD), r'runs.jsonl:7: the same record as line 1'),
    (_lines(*[dict(N=1e6, D=2e7 * (i + 1), loss=3.0 - i / 100) for i in range(8)]), r'1 distinct N'),
    (_lines(*_GOOD[:3]), r'3 dense runs'),
    (_lines(*[dict(r, variant='nsa') for r in _GOOD]), r'0 dense runs'),
]


@pytest.mark.parametrize('text,pattern', BAD_RUNS)
def test_fit_refuses_bad_runs_in_one_line(tmp_path, capsys, text, pattern):
  path = tmp_path / 'runs.jsonl'
  path.write_text(text)
  with pytest.raises(SystemExit) as exit_:
    scaling.main(['fit', str(path), f'--out={tmp_path}'])
  message = str(exit_.value.code)  # what Python prints to stderr before exiting with status 1
  assert message.startswith('scaling fit: ') and '\n' not in message and re.search(pattern, message), message
  assert not capsys.readouterr().out


def test_fit_command_exits_1_without_traceback(tmp_path):
  (tmp_path / 'runs.jsonl').write_text(_lines(*_GOOD[:5], dict(N=1e7, loss=3.0)))
  run = subprocess.run([sys.executable, '-m', 'sparse_lm.scaling', 'fit', str(tmp_path / 'runs.jsonl')],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  last = run.stderr.strip().splitlines()[-1]  # the lines before it are the CUDA plugin's start-up log
  assert run.returncode == 1 and 'Traceback' not in run.stderr and not run.stdout, run.stderr
  assert re.match(r"scaling fit: .*runs.jsonl:6: no 'D'", last), last


def test_isoflop_groups_come_from_the_budget_field_only_and_the_legend_stays_inside(tmp_path):
  _, rng = fresh_rng()
  n, _, loss, c = isoflop_runs(rng, noise=0.002, budgets=np.geomspace(1e18, 1e22, 40), sizes=5)
  assert scaling.budget_groups(None) == {}  # no budgets: no groups invented from gaps in compute
  groups = scaling.budget_groups(c)
  assert len(groups) == 40
  fig = scaling.plot_isoflops(tmp_path / 'iso.png', n, loss, groups, None)
  renderer = FigureCanvasAgg(fig).get_renderer()
  box, frame = fig.axes[0].get_legend().get_window_extent(renderer), fig.axes[0].get_window_extent(renderer)
  assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_fit_prints_before_plotting_and_a_failed_plot_is_a_warning(tmp_path, capsys):
  printed = []
  blocked = tmp_path / 'plots'
  blocked.write_text('a file where the plot folder would go')
  scaling.fit_runs(_GOOD, bootstrap=0, grid='small', starts=4, out=blocked, report=printed.append)
  assert len(printed) == 1 and printed[0]['num_dense_runs'] == 6
  warnings = capsys.readouterr().err.strip().splitlines()
  assert len(warnings) == 3 and all(w.startswith('warning: ') and 'not drawn' in w for w in warnings)


# ----------------------------------------------------------------------------- sweep and collect

def test_rung_shape_rebuilds_the_rung():
  rung = sweep.ladder.RUNGS['3m']
  sized = sweep.sized_config('dense', '3m', rung.num_layers, rung.d_model)
  assert sized.to_dict() == sweep.ladder.dense_config('3m').to_dict()
  assert sweep.shape_for(sweep.rung_params()['3m']) == ('3m', rung.num_layers, rung.d_model)


@pytest.mark.parametrize('variant', ['nsa', 'mosa', 'mosa_causal', 'routing', 'routing_causal', 'moe'])
def test_variants_are_sized_from_the_dense_shape(variant):
  """A variant at a sweep's size is the dense model of that size turned into the variant: NSA at equal
  parameters, MoE at equal active parameters, MoSA at equal attention FLOPs, routing beside local heads."""
  dense = sweep.sized_config('dense', '300k', 3, 80)
  c = sweep.sized_config(variant, '300k', 3, 80)
  count = lambda config: flops.param_counts(sweep.with_vocab(config).model)  # noqa: E731
  assert (c.model.num_layers, c.model.d_model) == (3, 80)
  checks.check_model(c.model)  # what train.py would accept
  if variant == 'nsa':
    assert count(c)['total_params'] == pytest.approx(count(dense)['total_params'], rel=0.02)
  if variant == 'moe':
    assert count(c)['active_params'] == pytest.approx(count(dense)['total_params'], rel=0.02)
  if variant.startswith('mosa'):
    assert c.model.mosa.num_heads > 0 and c.model.num_heads < dense.model.num_heads
  if variant.startswith('routing'):
    assert c.model.routing.num_heads + c.model.num_heads == dense.model.num_heads


def test_nsa_too_small_for_equal_parameters_says_so():
  with pytest.raises(ValueError, match='NSA at num_layers=1, d_model=48') as error:
    sweep.sized_config('nsa', '100k', 1, 48)
  assert '\n' not in str(error.value)


def finish(workdir, steps, loss=2.0):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'metrics.jsonl').write_text(
      json.dumps({'step': steps // 2, 'eval_loss': 9.0, 'eval_bpb': 9.0}) + '\n'
      + json.dumps({'step': steps, 'eval_loss': loss, 'eval_bpb': loss / 0.69}) + '\n')


def test_sweep_prints_commands_and_skips_finished_runs(tmp_path, capsys):
  runs = sweep.plan([3e13], sweep.chinchilla_center(), sizes_per_budget=3)
  assert len(runs) == 3 and len({r.config.model.d_model for r in runs}) > 1
  for r in runs:
    fpt = flops.flops_per_token(sweep.with_vocab(r.config))['flops_per_token']['total']
    tokens = r.config.train.steps * r.config.train.batch_size * r.config.data.seq_len
    assert fpt * tokens == pytest.approx(3e13, rel=0.02)
  finish(tmp_path / runs[0].name, runs[0].config.train.steps)
  scaling.main(['sweep', '--budgets=3e13', '--sizes_per_budget=3', f'--workdir_root={tmp_path}'])
  printed = capsys.readouterr()
  lines = printed.out.splitlines()
  assert lines == [' '.join(r.command(tmp_path)) for r in runs[1:]]
  assert all(line.startswith('python train.py --config=configs/dense_') for line in lines)
  assert f'--config.train.steps={runs[1].config.train.steps}' in lines[0]
  assert runs[0].name in printed.err


def test_collect_gathers_finished_runs(tmp_path):
  runs = sweep.plan([1e13], sweep.chinchilla_center(), sizes_per_budget=2, spread=2)
  for i, r in enumerate(runs):
    workdir = tmp_path / r.name
    workdir.mkdir()
    (workdir / 'config.json').write_text(sweep.with_vocab(r.config).to_json_best_effort())
    steps = r.config.train.steps
    finish(workdir, steps if i == 0 else steps + 1, loss=1.5)
  out = tmp_path / 'runs.jsonl'
  scaling.main(['collect', f'--workdir_root={tmp_path}', f'--out={out}'])
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['name'] for r in records] == [runs[0].name]
  record, config = records[0], sweep.with_vocab(runs[0].config)
  counts = flops.flops_per_token(config)
  tokens = config.train.steps * config.train.batch_size * config.data.seq_len
  assert record['variant'] == 'dense' and record['budget'] == 1e13 and record['loss'] == 1.5
  assert record['N'] == counts['total_params'] and record['D'] == tokens
  assert record['C'] == pytest.approx(counts['flops_per_token']['total'] * tokens)
  assert record['C_6ND'] == 6 * record['N'] * tokens
