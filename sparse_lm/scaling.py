"""Scaling laws: fit the dense baseline, then say what each sparse or MoE run is worth in dense compute.

    python -m sparse_lm.scaling sweep --budgets=1e13,3e13,1e14 --sizes_per_budget=5 \
        --workdir_root=runs/ladder [--variant=dense] [--print | --run]
    python -m sparse_lm.scaling collect --workdir_root=runs/ladder --out=runs.jsonl
    python -m sparse_lm.scaling fit runs.jsonl [--out=DIR] [--bootstrap=200] [--seed=0] [--grid=full]

`RUNS.jsonl` holds one run per line with at least `N` (parameters), `D` (training tokens) and `loss`;
`collect` also writes `C` (training FLOPs, attention included), `budget` and `variant`. `fit` fits
`L(N, D) = E + A / N^alpha + B / D^beta` to the dense runs (those without a `variant` or with
`variant: dense`), prints one JSON object and writes PNG plots to `--out`:

- approach 3 of Hoffmann et al. 2022 (App. D.2): Huber loss (delta 1e-3) between predicted and observed
  log loss, L-BFGS from a grid of initialisations, the best kept; percentile intervals from refits on
  runs resampled with replacement (as Besiroglu et al. 2024 do for the same fit);
- approach 2 (Sec. 3.2) when runs form isoFLOP groups: a parabola of loss against log N per budget, its
  minimum N*(C), D*(C) = C / flops_per_token(N*), then N* ~ C^a and D* ~ C^b by least squares in logs;
- the compute-optimal allocation that approach 3 implies (Hoffmann et al. 2022, Eq. 4, with C = 6ND);
- for every other run, its compute multiplier: the dense compute the fitted frontier needs to reach the
  run's loss, divided by the run's compute.

Compute is the run's `C` where the file has it (real FLOPs, attention included) and 6ND where it does
not; the frontier converts parameters to FLOPs per token with a power law fitted to the dense runs, so
dense and sparse runs are charged the same way.
"""

import argparse
import dataclasses
import itertools
import json
import math
import pathlib
import sys

import numpy as np
import scipy.optimize
import scipy.special
from matplotlib.figure import Figure

from sparse_lm import sweep
from sparse_lm.errors import ConfigError

HUBER_DELTA = 1e-3
REFIT_MINIMA = 4  # the full fit's best distinct minima, where each bootstrap refit starts (with others)
INTERVAL_PERCENTILES = (2.5, 97.5)


@dataclasses.dataclass(frozen=True)
class Law:
  """L(N, D) = E + A / N^alpha + B / D^beta."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def loss(self, n, d):
    return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

  def allocation_exponents(self) -> dict:
    """N_opt = G (C/6)^a and D_opt = (C/6)^b / G for C = 6ND (Hoffmann et al. 2022, Eq. 4)."""
    s = self.alpha + self.beta
    return dict(compute='6ND', G=(self.alpha * self.A / (self.beta * self.B)) ** (1 / s),
                a=self.beta / s, b=self.alpha / s)

  def allocation(self, c):
    """Compute-optimal N and D for C = 6ND."""
    x = self.allocation_exponents()
    c6 = np.asarray(c, np.float64) / 6
    return x['G'] * c6 ** x['a'], c6 ** x['b'] / x['G']

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FlopsModel:
  """Training FLOPs per token as a function of parameters, k N^gamma; 6N is k=6, gamma=1."""
  k: float = 6.0
  gamma: float = 1.0

  def __call__(self, n):
    return self.k * np.power(n, self.gamma)


# ----------------------------------------------------------------------------- approach 3

def init_grid(size: str = 'full') -> np.ndarray:
  """Initial (a, b, e, alpha, beta), a grid as in Hoffmann et al. 2022, App. D.2."""
  if size == 'full':
    axes = (np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5),
            np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))
  elif size == 'small':
    axes = ((5., 15.), (5., 15.), (-.5, .5), (.25, .75), (.25, .75))
  else:
    raise ValueError(f"grid={size!r} is not one of 'full', 'small'")
  return np.array(list(itertools.product(*axes)), np.float64)


def huber_objective(theta_P, logn_R, logd_R, logl_R, delta=HUBER_DELTA):
  """Sum of Huber losses of the log-loss residuals over delta^2, and its gradient.

  theta is (a, b, e, alpha, beta) and the prediction LSE(a - alpha log N, b - beta log D, e). Dividing
  by delta^2 leaves the minimiser alone but brings the value to order one, where L-BFGS-B's stopping
  rules work (on the raw ~1e-6 values they end the search early; Besiroglu et al. 2024, Sec. 3).
  """
  a, b, e, alpha, beta = theta_P
  z_3R = np.stack([a - alpha * logn_R, b - beta * logd_R, np.full_like(logn_R, e)])
  top_R = z_3R.max(0)
  exp_3R = np.exp(z_3R - top_R)
  sum_R = exp_3R.sum(0)
  r_R = top_R + np.log(sum_R) - logl_R
  value = _huber(r_R, delta).sum() / delta**2
  psi_w_3R = np.clip(r_R, -delta, delta) / delta**2 * exp_3R / sum_R
  grad_P = np.array([psi_w_3R[0].sum(), psi_w_3R[1].sum(), psi_w_3R[2].sum(),
                     -psi_w_3R[0] @ logn_R, -psi_w_3R[1] @ logd_R])
  return value, grad_P


def _huber(r, delta):
  return np.where(np.abs(r) <= delta, r**2 / 2, delta * (np.abs(r) - delta / 2))


def _grid_objectives(theta_GP, logn_R, logd_R, logl_R, delta=HUBER_DELTA):
  z_G3R = np.stack([theta_GP[:, :1] - theta_GP[:, 3:4] * logn_R,
                    theta_GP[:, 1:2] - theta_GP[:, 4:5] * logd_R,
                    np.broadcast_to(theta_GP[:, 2:3], (len(theta_GP), len(logn_R)))], axis=1)
  return _huber(scipy.special.logsumexp(z_G3R, axis=1) - logl_R, delta).sum(1)


def _recentre(theta_GP, shift_n, shift_d):
  """Moves (a, b) to the parameterisation in log N - shift_n and log D - shift_d."""
  theta_GP = np.array(theta_GP, np.float64)
  theta_GP[..., 0] -= theta_GP[..., 3] * shift_n
  theta_GP[..., 1] -= theta_GP[..., 4] * shift_d
  return theta_GP


def fit_law(n_R, d_R, loss_R, *, inits_GP=None, starts=None, delta=HUBER_DELTA) -> tuple[Law, float]:
  """Approach 3: L-BFGS from the initialisations, the `starts` best of them by initial objective (all
  when None); the best fit wins. Returns the law and its objective (the sum of Huber losses).

  The search runs in log N and log D centred on their means, which decorrelates (a, alpha) and
  (b, beta) and so shortens it; the law is the same.
  """
  law, objective, _, _ = _fit(n_R, d_R, loss_R, inits_GP=inits_GP, starts=starts, delta=delta)
  return law, objective


def _fit(n_R, d_R, loss_R, *, inits_GP=None, starts=None, delta=HUBER_DELTA, winners=0):
  """`fit_law`, the `winners` best distinct minima it reached and the initialisations it started
  from (both as theta), for the bootstrap refits to start from."""
  logn_R, logd_R, logl_R = np.log(n_R), np.log(d_R), np.log(loss_R)
  inits_GP = init_grid() if inits_GP is None else inits_GP
  if starts is not None and starts < len(inits_GP):
    order = np.argsort(_grid_objectives(inits_GP, logn_R, logd_R, logl_R, delta))
    inits_GP = inits_GP[order[:starts]]
  mean_n, mean_d = logn_R.mean(), logd_R.mean()
  found = []
  for theta0_P in _recentre(inits_GP, mean_n, mean_d):
    res = scipy.optimize.minimize(huber_objective, theta0_P,
                                  args=(logn_R - mean_n, logd_R - mean_d, logl_R, delta), jac=True,
                                  method='L-BFGS-B', options=dict(ftol=1e-11, gtol=1e-8, maxiter=1000))
    if np.isfinite(res.fun):
      found.append((float(res.fun), res.x))
  found.sort(key=lambda f: f[0])
  a, b, e, alpha, beta = _recentre(found[0][1], -mean_n, -mean_d)
  law = Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))
  distinct = []
  for _, x in found:
    if len(distinct) < winners and all(np.abs(x - y).max() > 1e-3 for y in distinct):
      distinct.append(x)
  minima_GP = _recentre(np.array(distinct).reshape(-1, 5), -mean_n, -mean_d)
  return law, found[0][0] * delta**2, minima_GP, inits_GP


def theta_of(law: Law) -> np.ndarray:
  return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def bootstrap_laws(n_R, d_R, loss_R, *, start: Law, count: int, seed: int, grid='full',
                   starts=5, grid_GP=None, minima_GP=None) -> list[Law]:
  """Refits on runs resampled with replacement, each from the full fit, its other distinct minima
  `minima_GP` and the `starts` best points for that resample among `grid_GP` (default: all of `grid`;
  `fit_runs` passes the full fit's own grid winners, which is as good and much cheaper to rank)."""
  rng = np.random.default_rng(seed)
  grid_GP = init_grid(grid) if grid_GP is None else grid_GP
  minima_GP = np.zeros((0, 5)) if minima_GP is None else minima_GP
  laws = []
  for _ in range(count):
    idx_R = rng.integers(0, len(n_R), len(n_R))
    n_S, d_S, loss_S = n_R[idx_R], d_R[idx_R], loss_R[idx_R]
    best_GP = grid_GP[np.argsort(_grid_objectives(grid_GP, np.log(n_S), np.log(d_S), np.log(loss_S)))]
    inits_GP = np.concatenate([theta_of(start)[None], minima_GP, best_GP[:starts]])
    laws.append(fit_law(n_S, d_S, loss_S, inits_GP=inits_GP)[0])
  return laws


def percentile_interval(values) -> list[float]:
  """A percentile interval that keeps infinities (it picks samples, never interpolates between them)."""
  return [float(np.percentile(values, q, method='inverted_cdf')) for q in INTERVAL_PERCENTILES]


# ----------------------------------------------------------------------------- approach 2

def budget_groups(budget_R=None) -> dict[float, np.ndarray]:
  """Run indices per isoFLOP budget, by the runs' `budget` field only (`scaling sweep` writes it); none
  without it. Guessing budgets from gaps in compute splits any spread of runs into dozens of groups."""
  if budget_R is None:
    return {}
  return {float(b): np.flatnonzero(budget_R == b) for b in np.unique(budget_R)}


def isoflop_minimum(logn_R, loss_R):
  """Parabola of loss against log N and its minimum; None without three sizes, a convex fit, or a
  minimum inside the sizes run (a vertex outside them is an extrapolation, and a budget whose best
  run is its smallest or largest size only bounds the optimum)."""
  if len(np.unique(logn_R)) < 3:
    return None
  coef_3 = np.polyfit(logn_R, loss_R, 2)
  if coef_3[0] <= 0:
    return None
  logn_opt = -coef_3[1] / (2 * coef_3[0])
  if not np.min(logn_R) <= logn_opt <= np.max(logn_R):
    return None
  return coef_3, logn_opt, float(np.polyval(coef_3, logn_opt))


def power_law(x_K, y_K) -> tuple[float, float]:
  """Exponent and coefficient of y = coef * x^exponent, least squares in log space."""
  exponent, log_coef = np.polyfit(np.log(x_K), np.log(y_K), 1)
  return float(exponent), float(math.exp(log_coef))


def approach2(n_R, loss_R, groups, fpt: FlopsModel) -> dict | None:
  """Per-budget optima and the power laws N* = kN C^a, D* = kD C^b; None with fewer than 2 budgets."""
  optima, skipped = [], []
  for c, idx in sorted(groups.items()):
    found = isoflop_minimum(np.log(n_R[idx]), loss_R[idx])
    if found is None:
      skipped.append(c)
    else:
      coef_3, logn_opt, loss_opt = found
      n_opt = math.exp(logn_opt)
      optima.append(dict(C=c, N_opt=n_opt, D_opt=float(c / fpt(n_opt)), loss_opt=loss_opt,
                         parabola=coef_3.tolist(), sizes=len(idx)))
  if len(optima) < 2:
    return None
  c_K, n_K, d_K = (np.array([o[key] for o in optima]) for key in ('C', 'N_opt', 'D_opt'))
  a, kn = power_law(c_K, n_K)
  b, kd = power_law(c_K, d_K)
  return dict(a=a, b=b, N_coef=kn, D_coef=kd, budgets=optima, skipped_budgets=skipped)


def bootstrap_approach2(n_R, loss_R, groups, fpt: FlopsModel, *, count: int, seed: int) -> dict:
  """Percentile intervals of a and b from runs resampled with replacement within each budget."""
  rng = np.random.default_rng(seed)
  samples = {'a': [], 'b': []}
  for _ in range(count):
    resampled = {c: rng.choice(idx, len(idx)) for c, idx in groups.items()}
    fit = approach2(n_R, loss_R, resampled, fpt)
    if fit is not None:
      samples['a'].append(fit['a'])
      samples['b'].append(fit['b'])
  return {k: percentile_interval(v) for k, v in samples.items() if v}


# ----------------------------------------------------------------------------- the frontier

def fit_flops_model(n_R, d_R, c_R) -> FlopsModel:
  """FLOPs per token against parameters across the dense runs, a straight line in logs."""
  if c_R is None:
    return FlopsModel()
  fpt_R = c_R / d_R
  if len(np.unique(n_R)) < 2:
    return FlopsModel(k=float(np.mean(fpt_R / n_R)), gamma=1.0)
  gamma, k = power_law(n_R, fpt_R)
  return FlopsModel(k=k, gamma=gamma)


def frontier_allocation(law: Law, c, fpt: FlopsModel):
  """The N minimising L(N, C / fpt(N)), closed form for fpt = k N^gamma (Eq. 4 when k=6, gamma=1)."""
  s = law.alpha + fpt.gamma * law.beta
  g = (law.alpha * law.A / (fpt.gamma * law.beta * law.B)) ** (1 / s)
  n = g * (np.asarray(c, np.float64) / fpt.k) ** (law.beta / s)
  return n, c / fpt(n)


def frontier_loss(law: Law, c, fpt: FlopsModel = FlopsModel()):
  """L*(C): the lowest loss the law reaches with compute C."""
  return law.loss(*frontier_allocation(law, c, fpt))


def compute_multiplier(law: Law, c_run: float, loss_run: float, fpt: FlopsModel = FlopsModel()) -> float:
  """Dense compute on the frontier reaching `loss_run`, divided by `c_run`; inf at or below E.

  On the frontier L*(C) - E = K C^(-alpha beta / (alpha + gamma beta)), a power law in C, so the
  dense compute for a loss follows in closed form from the frontier's loss at `c_run`.
  """
  if loss_run <= law.E:
    return math.inf
  s = law.alpha + fpt.gamma * law.beta
  gap_ratio = (loss_run - law.E) / (float(frontier_loss(law, c_run, fpt)) - law.E)
  return float(gap_ratio ** (-s / (law.alpha * law.beta)))


# ----------------------------------------------------------------------------- plots

def plot_isoflops(path, n_R, loss_R, groups, fit2):
  fig = Figure(figsize=(6, 4.5))
  ax = fig.add_subplot()
  colors = _colors(len(groups))
  parabolas = {o['C']: o for o in (fit2 or {}).get('budgets', [])}
  if not groups:
    ax.scatter(n_R, loss_R, color='gray', s=16, label='no budget field: runs not grouped')
  for color, (c, idx) in zip(colors, sorted(groups.items()), strict=True):
    ax.scatter(n_R[idx], loss_R[idx], color=color, s=16, label=f'C = {c:.2g}')
    if c in parabolas:
      logn_S = np.linspace(np.log(n_R[idx]).min(), np.log(n_R[idx]).max(), 100)
      ax.plot(np.exp(logn_S), np.polyval(parabolas[c]['parabola'], logn_S), color=color, lw=1)
      ax.scatter([parabolas[c]['N_opt']], [parabolas[c]['loss_opt']], color=color, marker='*', s=80)
  ax.set(xscale='log', xlabel='parameters N', ylabel='final eval loss', title='isoFLOP curves')
  # Inside the axes, in as many columns as keep it short.
  ax.legend(fontsize=6, loc='upper right', ncol=max(1, math.ceil(len(groups) / 8)), framealpha=0.8)
  fig.savefig(path, dpi=120, bbox_inches='tight')
  return fig


def plot_optimal(path, law: Law, fpt: FlopsModel, fit2, c_range):
  fig = Figure(figsize=(10, 4))
  c_S = np.geomspace(*c_range, 100)
  n_S, d_S = frontier_allocation(law, c_S, fpt)
  for i, (key, line_S, name) in enumerate((('N_opt', n_S, 'N*'), ('D_opt', d_S, 'D*'))):
    ax = fig.add_subplot(1, 2, i + 1)
    ax.plot(c_S, line_S, color='k', lw=1, label='approach 3')
    if fit2 is not None:
      exponent, coef = (fit2['a'], fit2['N_coef']) if key == 'N_opt' else (fit2['b'], fit2['D_coef'])
      ax.scatter([o['C'] for o in fit2['budgets']], [o[key] for o in fit2['budgets']], color='C0',
                 label='approach 2 (parabola minima)')
      ax.plot(c_S, coef * c_S**exponent, color='C0', ls='--', label=f'C^{exponent:.3f}')
    ax.set(xscale='log', yscale='log', xlabel='compute C (FLOPs)', ylabel=name,
           title=f'compute-optimal {name}')
    ax.legend(fontsize=7)
  fig.savefig(path, dpi=120, bbox_inches='tight')


def plot_frontier(path, law: Law, fpt: FlopsModel, dense, variants):
  """Dense runs, the law's frontier L*(C), and each variant run placed on it, labelled by variant."""
  fig = Figure(figsize=(6, 4.5))
  ax = fig.add_subplot()
  c_all = [r['C'] for r in dense + variants]
  c_S = np.geomspace(min(c_all) / 2, max(c_all) * 2, 200)
  ax.scatter([r['C'] for r in dense], [r['loss'] for r in dense], color='0.6', s=12, label='dense runs')
  ax.plot(c_S, frontier_loss(law, c_S, fpt), color='k', lw=1, label='dense frontier L*(C)')
  names = sorted({r['variant'] for r in variants})
  for color, name in zip(_colors(len(names)), names, strict=True):
    runs = [r for r in variants if r['variant'] == name]
    causal = all(r.get('causal', True) for r in runs)
    ax.scatter([r['C'] for r in runs], [r['loss'] for r in runs], color=color, marker='D' if causal else 'x',
               s=30, label=name if causal else f'{name} (NOT causal)')
    for r in runs:
      ax.annotate(f"{_fmt_multiplier(r['multiplier'])}x", (r['C'], r['loss']), fontsize=7,
                  xytext=(4, 4), textcoords='offset points')
  ax.set(xscale='log', xlabel='compute C (FLOPs)', ylabel='final eval loss',
         title='loss against compute; labels: compute multiplier; x: sees later tokens')
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=120, bbox_inches='tight')


def _colors(k):
  return [f'C{i % 10}' for i in range(k)]


def _fmt_multiplier(m):
  return 'inf' if math.isinf(m) else f'{m:.2f}'


# ----------------------------------------------------------------------------- fit command

class RunsError(ValueError):
  """A runs file `fit` cannot use; the message is one line naming the file and line."""


MIN_DENSE_RUNS = 6  # more points than the law's five parameters


def load_runs(path) -> list[dict]:
  """The records of a runs file, each checked: a JSON object with finite N, D and loss > 0 (and C, if
  given), no record repeated (it would count twice in the bootstrap)."""
  try:
    lines = pathlib.Path(path).read_text().splitlines()
  except OSError as e:
    raise RunsError(f'{path}: cannot read it ({e.strerror})') from None
  runs, seen = [], {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f'{path}:{number}'
    try:
      run = json.loads(line)
    except json.JSONDecodeError as e:
      raise RunsError(f'{where}: not JSON ({e.msg} at column {e.colno})') from None
    if not isinstance(run, dict):
      raise RunsError(f'{where}: expected a JSON object with N, D and loss, got {type(run).__name__}')
    for key in ('N', 'D', 'loss') + (('C',) if 'C' in run else ()):
      value = run.get(key)
      if key not in run:
        raise RunsError(f'{where}: no {key!r} (each run needs N, D and loss; C is optional)')
      number_like = isinstance(value, int | float) and not isinstance(value, bool)
      if not (number_like and math.isfinite(value) and value > 0):
        raise RunsError(f'{where}: {key}={value!r} must be a finite number > 0')
    key = json.dumps(run, sort_keys=True)
    if key in seen:
      raise RunsError(f'{where}: the same record as line {seen[key]}; remove one (a repeated record would '
                      'count as two runs)')
    seen[key] = number
    runs.append(run)
  return runs


def check_identifiable(runs: list[dict], path='runs') -> None:
  """Refuses dense runs that cannot pin down the five constants of L = E + A/N^alpha + B/D^beta."""
  dense = [r for r in runs if is_dense(r)]
  sizes, tokens = len({r['N'] for r in dense}), len({r['D'] for r in dense})
  if len(dense) < MIN_DENSE_RUNS or sizes < 2 or tokens < 2:
    raise RunsError(f'{path}: {len(dense)} dense runs with {sizes} distinct N and {tokens} distinct D; the '
                    f'law has 5 constants and needs at least {MIN_DENSE_RUNS} dense runs over 2 or more '
                    'values of each (variant runs are placed on the dense law, not fitted)')


def is_dense(run: dict) -> bool:
  return run.get('variant', 'dense') == 'dense'


def run_compute(run: dict) -> float:
  return float(run['C']) if 'C' in run else 6.0 * run['N'] * run['D']


def fit_runs(runs: list[dict], *, bootstrap=100, seed=0, grid='full', starts=100, out=None,
             report=None, source='runs') -> dict:
  """Everything `fit` prints: the law, intervals, approach 2, the allocation and variant multipliers.
  `report(result)` is called before the plots are drawn into `out`; a plot that fails is a warning.
  `source` names the runs in the error for runs that cannot identify the law."""
  check_identifiable(runs, source)
  dense = [dict(r, C=run_compute(r)) for r in runs if is_dense(r)]
  variants = [dict(r, C=run_compute(r)) for r in runs if not is_dense(r)]
  n_R, d_R, loss_R, c_R = (np.array([r[k] for r in dense], np.float64) for k in ('N', 'D', 'loss', 'C'))
  # The refits start from the full fit's minima and its best grid points re-ranked per resample, not
  # from a ranking of the whole grid for every resample (most of the time, for the same minima).
  law, objective, minima_GP, winners_GP = _fit(n_R, d_R, loss_R, inits_GP=init_grid(grid),
                                               starts=starts or None, winners=REFIT_MINIMA)
  fpt = fit_flops_model(n_R, d_R, c_R if all('C' in r for r in runs if is_dense(r)) else None)
  laws = bootstrap_laws(n_R, d_R, loss_R, start=law, count=bootstrap, seed=seed, grid_GP=winners_GP,
                        minima_GP=minima_GP[1:])
  has_budgets = all(r.get('budget') is not None for r in dense)
  budget_R = np.array([r['budget'] for r in dense], np.float64) if has_budgets else None
  groups = budget_groups(budget_R)
  fit2 = approach2(n_R, loss_R, groups, fpt)
  if fit2 is not None and bootstrap:
    fit2['intervals'] = bootstrap_approach2(n_R, loss_R, groups, fpt, count=bootstrap, seed=seed)
  place_variants(variants, law, laws, fpt)
  result = dict(
      **law.to_dict(), objective=objective, huber_delta=HUBER_DELTA, num_dense_runs=len(dense),
      intervals={k: percentile_interval([getattr(b, k) for b in laws]) for k in law.to_dict()} if laws
      else None,
      bootstrap=bootstrap, starts=starts, allocation=law.allocation_exponents(),
      flops_per_token=dataclasses.asdict(fpt), approach2=fit2,
      variants=[{k: r.get(k) for k in ('name', 'variant', 'budget', 'N', 'D', 'C', 'loss', 'causal',
                                       'causality_leak', 'C_dense', 'multiplier', 'interval') if k in r}
                for r in variants])
  if report is not None:
    report(result)
  if out is not None:
    out = pathlib.Path(out)
    plots = {'isoflops.png': lambda p: plot_isoflops(p, n_R, loss_R, groups, fit2),
             'optimal.png': lambda p: plot_optimal(p, law, fpt, fit2, (c_R.min() / 2, c_R.max() * 2)),
             'frontier.png': lambda p: plot_frontier(p, law, fpt, dense, variants)}
    for name, plot in plots.items():
      try:
        out.mkdir(parents=True, exist_ok=True)
        plot(out / name)
      except Exception as e:  # noqa: BLE001 -- the fit is printed already; a plot is not worth losing it
        print(f'warning: {out / name} not drawn ({type(e).__name__}: {str(e).splitlines()[0]})',
              file=sys.stderr)
  return result


def place_variants(variants: list[dict], law: Law, laws: list[Law], fpt: FlopsModel) -> None:
  """Adds each run's multiplier, its dense-equivalent compute and (with bootstrap laws) an interval."""
  for r in variants:
    r['multiplier'] = compute_multiplier(law, r['C'], r['loss'], fpt)
    r['C_dense'] = r['multiplier'] * r['C']
    if laws:
      r['interval'] = percentile_interval([compute_multiplier(b, r['C'], r['loss'], fpt) for b in laws])


def json_safe(x):
  """Infinities as the strings 'inf' and '-inf' (a multiplier below E), not invalid JSON."""
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [json_safe(v) for v in x]
  if isinstance(x, float | np.floating) and not math.isfinite(x):
    return str(float(x))
  if isinstance(x, np.generic):
    return x.item()
  return x


# ----------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m sparse_lm.scaling', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  fit = sub.add_parser('fit', help='fit the dense runs, place the others; JSON to stdout, PNGs to --out')
  fit.add_argument('runs', help='RUNS.jsonl')
  fit.add_argument('--out', default='scaling_plots', help='directory for the PNG plots')
  fit.add_argument('--bootstrap', type=int, default=100, help='bootstrap refits (0: no intervals)')
  fit.add_argument('--seed', type=int, default=0)
  fit.add_argument('--grid', choices=('full', 'small'), default='full',
                   help='initialisations: the paper grid (4500 points) or a 32-point one')
  fit.add_argument('--starts', type=int, default=100,
                   help='L-BFGS runs from this many grid points, those with the lowest initial '
                        'objective (0: from every point, as the paper; ~2 minutes on the full grid)')
  run = sub.add_parser('sweep', help='print or run the isoFLOP runs of a list of budgets')
  run.add_argument('--budgets', required=True, help='comma-separated training FLOPs, e.g. 1e13,3e13')
  run.add_argument('--sizes_per_budget', type=int, default=5)
  run.add_argument('--spread', type=float, default=4.0,
                   help='sizes run from the optimum / spread to the optimum x spread')
  run.add_argument('--workdir_root', required=True)
  run.add_argument('--variant', default='dense', help='dense, nsa, or an attention or MLP name')
  run.add_argument('--tokens_per_param', type=float, default=sweep.ladder.TOKENS_PER_PARAM,
                   help='centre each budget on D = this x N (with C = 6ND) ...')
  run.add_argument('--law', help='... or on the allocation of a `fit` JSON output (E, A, B, alpha, beta)')
  run.add_argument('--params', type=float,
                   help='... or on this many parameters at every budget (say, an isoFLOP minimum)')
  run.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='a config override for every run, e.g. data.source=text:corpus.txt')
  mode = run.add_mutually_exclusive_group()
  mode.add_argument('--print', dest='run', action='store_false', help='print the commands (default)')
  mode.add_argument('--run', dest='run', action='store_true', help='run them here, one after another')
  run.set_defaults(run=False)
  gather = sub.add_parser('collect', help='final eval losses of the finished runs, one JSON line each')
  gather.add_argument('--workdir_root', required=True)
  gather.add_argument('--out', default='runs.jsonl')
  return parser


def law_center(path):
  """N_opt(C) of a fitted law (the JSON that `fit` prints)."""
  try:
    fitted = json.loads(pathlib.Path(path).read_text())
    law = Law(**{k: float(fitted[k]) for k in ('E', 'A', 'B', 'alpha', 'beta')})
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise RunsError(f'--law={path}: not the JSON of `scaling fit` with E, A, B, alpha and beta '
                    f'({type(e).__name__}: {e})') from None
  return lambda c: float(law.allocation(c)[0])


def _budgets(text: str) -> list[float]:
  try:
    budgets = [float(b) for b in text.split(',')]
  except ValueError:
    budgets = []
  if not budgets or not all(math.isfinite(b) and b > 0 for b in budgets):
    raise RunsError(f'--budgets={text}: expected comma-separated training FLOPs > 0, e.g. 1e13,3e13')
  return budgets


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  try:
    _command(args)
  except (RunsError, ConfigError) as e:
    sys.exit(f'scaling {args.command}: {str(e).splitlines()[0]}')


def _command(args) -> None:
  if args.command == 'fit':
    fit_runs(load_runs(args.runs), source=args.runs, bootstrap=args.bootstrap, seed=args.seed,
             grid=args.grid, starts=args.starts, out=args.out,
             report=lambda result: print(json.dumps(json_safe(result), indent=2), flush=True))
  elif args.command == 'sweep':
    if args.params:
      center = lambda c: args.params  # noqa: E731
    else:
      center = law_center(args.law) if args.law else sweep.chinchilla_center(args.tokens_per_param)
    budgets = _budgets(args.budgets)
    for name in ('sizes_per_budget', 'spread', 'tokens_per_param', 'params'):
      value = getattr(args, name)
      if value is not None and not value > (1 if name == 'spread' else 0):
        raise RunsError(f'--{name}={value} must be > {1 if name == "spread" else 0}')
    runs = sweep.plan(budgets, center, sizes_per_budget=args.sizes_per_budget, spread=args.spread,
                      variant=args.variant, sets=args.set)
    sweep.execute(runs, args.workdir_root, run=args.run)
  else:
    if not pathlib.Path(args.workdir_root).is_dir():
      raise RunsError(f'--workdir_root={args.workdir_root} is not a directory')
    records = sweep.collect(args.workdir_root)
    pathlib.Path(args.out).write_text(''.join(json.dumps(r) + '\n' for r in records))
    print(f'{len(records)} finished runs -> {args.out}', file=sys.stderr)


if __name__ == '__main__':
  main()
