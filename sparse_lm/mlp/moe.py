"""Mixture-of-Experts SwiGLU feed-forward layer (`model.mlp='moe'`, settings in `model.moe`).

A linear router scores the E experts for every token; a token's output is the weighted sum of the
SwiGLU experts it is assigned to, plus the always-on shared experts. A token no expert processes adds
nothing: the block's residual connection carries it through unchanged.

Routing (`moe.router`):

- `token_choice`: every token takes its top-k experts by score, softmax or sigmoid of the router logits
  (`moe.score`; Shazeer et al. 2017, Switch: Fedus et al. 2021, sigmoid: DeepSeek-V3 2024). With
  `moe.normalize_top_k` the k chosen scores are rescaled to sum to one (for k = 1 that leaves the
  router no gradient, which is why Switch does not normalise).
- `expert_choice` (Zhou et al. 2022): every expert takes its top C tokens, C = capacity_factor * N * k / E
  over the N tokens of the whole batch. An expert's choice compares tokens of all sequences and of all
  positions, later ones included, so this routing is NOT causal: a token's output depends on the
  future and on other rows of the batch, and decoding cannot reproduce training.
- Auxiliary-loss-free balancing (Wang et al. 2024): with `moe.bias_update_rate` > 0 a per-expert bias is
  added to the scores for the top-k *selection* only (the combine weights stay the raw scores). It is
  model state, not a parameter: during a train step the layer sets it to
  b + rate * sign(mean load - load) from the batch's load, and the train step carries the new value.
- Shared experts (Dai et al. 2024, DeepSeekMoE): `moe.num_shared_experts` experts every token uses.
- Fine-grained experts (DeepSeekMoE): each expert is `moe.granularity` x `mlp_dim` wide.

Losses and metrics, sown per layer: the Switch load-balancing loss E * sum_e f_e P_e (Fedus et al.
2021, Eq. 4; f_e the fraction of assignments to e, P_e the mean routing probability) and the router
z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022, ST-MoE, Eq. 5), each times its weight, as
`AuxLoss`es; `expert_load` (f_e, one value per expert, 1/E when balanced), `dropped_fraction` and
`router_entropy` as metrics.

Execution (`moe.execution`):

- `dropless`: sort the token-expert assignments by expert, run the experts as grouped matmuls
  (MegaBlocks, Gale et al. 2022), unsort and combine. Nothing is dropped.
- `capacity`: each expert has C = capacity_factor * N * k / E slots, filled first choices first (GShard,
  Lepikhin et al. 2020); the experts run as one batched matmul over an [E, C, D] buffer and assignments
  past C are dropped (`dropped_fraction` is their share). Not causal either: later tokens' first
  choices can take the slot an earlier token's second choice needed (`is_causal`).

Expert parallelism: inside a train step (`sharding.active_mesh()`), token-choice dispatch runs in
`jax.shard_map`. Every device routes its own tokens (its rows, and its part of each row when
`mesh.context` splits them); with `mesh.expert` = P > 1 the P devices of an
expert group, which hold the same rows, each take 1/P of them, send every assignment to the device
that owns its expert (E/P experts each) with an all-to-all, run their experts, send the results back
with a second all-to-all and reassemble the rows. Dropless buffers are padded to the worst case (all of
a device's assignments to one device) because XLA's fixed-size all-to-all needs static shapes; the
capacity buffers are exactly [E, C, D]. Capacity is counted per device, as in GShard, so with drops the
numbers depend on the mesh. Expert choice ranks tokens over the whole batch, so it runs outside
shard_map and XLA (GSPMD) partitions it, following the expert weights' split over `expert`. The
experts enter the dispatch as one copy per device holding other tokens, so their gradients leave it
unreduced and XLA sums them once a step, after gradient accumulation's microbatch loop (a psum inside
the shard_map ran once per microbatch; BENCHMARKS.md, sixth session).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec

from pallas_kernels.grouped_matmul import grouped_matmul
from sparse_lm import sharding
from sparse_lm.errors import ConfigError, require_choice, require_positive
from sparse_lm.layers import AuxLoss, output_stddev, param
from sparse_lm.mlp import base, dense

ROUTERS = ('token_choice', 'expert_choice')
SCORES = ('softmax', 'sigmoid')
EXECUTIONS = ('dropless', 'capacity')


class RoutingBias(nnx.Variable):
  """The auxiliary-loss-free balancing bias: model state the train step updates, never a gradient."""


def expert_width(cfg: ml_collections.ConfigDict) -> int:
  return round(cfg.mlp_dim * cfg.moe.granularity)


def capacity(num_tokens: int, cfg: ml_collections.ConfigDict) -> int:
  """Slots per expert for `num_tokens` tokens: capacity_factor x their fair share of assignments."""
  m = cfg.moe
  return max(1, min(num_tokens, -(-int(m.capacity_factor * num_tokens * m.top_k) // m.num_experts)))


class Mlp(base.Mlp):

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = cfg.moe
    d, f, e, pd = cfg.d_model, expert_width(cfg), m.num_experts, cfg.param_dtype
    self.router = param(rngs, (d, e), ('embed', None), stddev=d**-0.5, dtype='float32')
    self.expert_gate = param(rngs, (e, d, f), ('expert', 'embed', 'mlp'), stddev=d**-0.5, dtype=pd)
    self.expert_up = param(rngs, (e, d, f), ('expert', 'embed', 'mlp'), stddev=d**-0.5, dtype=pd)
    self.expert_down = param(rngs, (e, f, d), ('expert', 'mlp', 'embed'),
                             stddev=output_stddev(f, cfg.num_layers), dtype=pd)
    shared_cfg = ml_collections.ConfigDict({**cfg.to_dict(), 'mlp_dim': m.num_shared_experts * f})
    self.shared = dense.Mlp(shared_cfg, rngs=rngs) if m.num_shared_experts else None
    self.bias = RoutingBias(jnp.zeros((e,), jnp.float32)) if m.bias_update_rate else None
    self.model_cfg = ml_collections.FrozenConfigDict(cfg)  # static and hashable, part of the graphdef
    self.cfg = self.model_cfg.moe
    self.kernel = cfg.kernel
    self.dtype = jnp.dtype(cfg.dtype)

  @staticmethod
  def is_causal(cfg: ml_collections.ConfigDict) -> bool:
    """Only dropless token choice: expert choice ranks a token against later ones, and capacity
    execution lets later tokens' first choices take the slots an earlier token's second choice wanted."""
    return cfg.moe.router == 'token_choice' and cfg.moe.execution == 'dropless'

  @staticmethod
  def defaults() -> dict:
    m = ml_collections.ConfigDict()  # the module docstring says where each setting comes from
    m.num_experts = 8  # E routed experts per MoE layer
    m.top_k = 2  # k: experts per token (expert_choice: the average, sets the capacity)
    m.router = 'token_choice'  # 'token_choice' or 'expert_choice' (non-causal, Zhou et al. 2022)
    m.score = 'softmax'  # router scores: 'softmax' or 'sigmoid' of the logits
    m.normalize_top_k = True  # rescale the k chosen scores to sum to one
    m.granularity = 1.0  # expert width as a fraction of model.mlp_dim (0.25: fine-grained)
    m.num_shared_experts = 0  # experts every token uses (DeepSeekMoE), each as wide as one expert
    m.execution = 'dropless'  # 'dropless' (grouped matmul) or 'capacity' (drops overflow)
    m.capacity_factor = 1.25  # slots per expert = factor * tokens * k / E (capacity, expert_choice)
    m.load_balance_weight = 0.01  # Switch load-balancing loss (Fedus et al. 2021)
    m.z_loss_weight = 1e-3  # router z-loss (Zoph et al. 2022)
    m.bias_update_rate = 0.0  # aux-loss-free balancing bias step (Wang et al. 2024); 0: off
    m.every = 1  # MoE in every n-th layer from first_dense on, dense MLPs elsewhere
    m.first_dense = 0  # the first m layers keep the dense MLP
    return {'moe': m}

  @staticmethod
  def tiny_config() -> dict:
    return {'moe': {'num_experts': 4, 'top_k': 2}}

  @staticmethod
  def check_config(cfg: ml_collections.ConfigDict) -> None:
    """One ConfigError line for MoE settings that cannot run (the mesh is checked in checks.py)."""
    m = cfg.moe
    for key, allowed in (('router', ROUTERS), ('score', SCORES), ('execution', EXECUTIONS)):
      require_choice(f'model.moe.{key}', m[key], allowed)
    require_positive(m, 'model.moe', ('num_experts', 'top_k', 'every'))
    if m.top_k > m.num_experts:
      raise ConfigError(f'model.moe.top_k={m.top_k} exceeds model.moe.num_experts={m.num_experts}')
    if not isinstance(m.num_shared_experts, int) or m.num_shared_experts < 0:
      raise ConfigError(f'model.moe.num_shared_experts={m.num_shared_experts!r} must be an integer >= 0')
    if not isinstance(m.first_dense, int) or not 0 <= m.first_dense < cfg.num_layers:
      raise ConfigError(f'model.moe.first_dense={m.first_dense!r} must be in [0, model.num_layers='
                        f'{cfg.num_layers}) so that at least one layer is MoE')
    if not m.granularity > 0 or expert_width(cfg) < 1:
      raise ConfigError(f'model.moe.granularity={m.granularity!r} must make the expert width '
                        f'granularity * model.mlp_dim at least 1')
    for key in ('capacity_factor',):
      if not m[key] > 0:
        raise ConfigError(f'model.moe.{key}={m[key]!r} must be > 0')
    for key in ('load_balance_weight', 'z_loss_weight', 'bias_update_rate'):
      if not m[key] >= 0:
        raise ConfigError(f'model.moe.{key}={m[key]!r} must be >= 0')
    if m.bias_update_rate and m.router == 'expert_choice':
      raise ConfigError('model.moe.bias_update_rate must be 0 with model.moe.router=expert_choice '
                        '(experts choosing tokens are balanced by construction)')

  @staticmethod
  def param_uses_per_token(cfg: ml_collections.ConfigDict, *, computed: bool = True) -> dict[str, float]:
    """A token uses k of the E experts (`computed=False`: the active share). What runs (`computed`):
    where experts run fixed capacity buffers (expert choice, or capacity execution) every slot is
    computed, filled or not, capacity_factor * k of them. The router and shared experts a token
    always uses."""
    m = cfg.moe
    share = m.top_k / m.num_experts
    if computed and (m.router == 'expert_choice' or m.execution == 'capacity'):
      share *= m.capacity_factor
    return {'expert_gate': share, 'expert_up': share, 'expert_down': share}

  def __call__(self, x_BTD: jax.Array, *, update_state: bool = False) -> jax.Array:
    x_BTD = x_BTD.astype(self.dtype)
    logits_BTE = jnp.einsum('btd,de->bte', x_BTD.astype(jnp.float32), self.router[...])
    if self.cfg.score == 'softmax':
      scores_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    else:
      scores_BTE = jax.nn.sigmoid(logits_BTE)
    self._sow_router_stats(logits_BTE, scores_BTE)
    if self.cfg.router == 'expert_choice':
      y_BTD, dropped = self._expert_choice(x_BTD, scores_BTE)
    else:
      y_BTD, dropped = self._token_choice(x_BTD, scores_BTE, update_state)
    self.sow(nnx.Intermediate, 'dropped_fraction', dropped)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    return sharding.constrain(y_BTD.astype(self.dtype), ('batch', 'length', 'act_embed'))

  def _sow_router_stats(self, logits_BTE, scores_BTE) -> None:
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_BTE, axis=-1)))
    self.sow(nnx.Intermediate, 'router_z_loss', z)  # unweighted, a metric whatever its weight
    if self.cfg.z_loss_weight:
      self.sow(AuxLoss, 'router_z_aux_loss', self.cfg.z_loss_weight * z)
    probs_BTE = _as_distribution(scores_BTE)
    entropy_BT = -jnp.sum(probs_BTE * jnp.log(jnp.maximum(probs_BTE, 1e-30)), axis=-1)
    self.sow(nnx.Intermediate, 'router_entropy', jnp.mean(entropy_BT))

  def _experts(self):
    return tuple(w[...].astype(self.dtype) for w in (self.expert_gate, self.expert_up, self.expert_down))

  def _token_choice(self, x_BTD, scores_BTE, update_state: bool):
    m, E = self.cfg, self.cfg.num_experts
    select_BTE = scores_BTE
    if self.bias is not None:
      select_BTE = scores_BTE + jax.lax.stop_gradient(self.bias[...])[None, None, :]
    _, idx_BTK = jax.lax.top_k(select_BTE, m.top_k)
    w_BTK = jnp.take_along_axis(scores_BTE, idx_BTK, axis=-1)
    if m.normalize_top_k:
      w_BTK = w_BTK / jnp.sum(w_BTK, axis=-1, keepdims=True)
    load_E = jnp.bincount(idx_BTK.reshape(-1), length=E) / idx_BTK.size
    self.sow(nnx.Intermediate, 'expert_load', load_E)
    prob_E = jnp.mean(_as_distribution(scores_BTE), axis=(0, 1))
    balance = E * jnp.sum(load_E * prob_E)  # Switch Eq. 4; 1 when perfectly balanced
    self.sow(nnx.Intermediate, 'load_balance_loss', balance)  # unweighted, a metric whatever its weight
    if m.load_balance_weight:
      self.sow(AuxLoss, 'load_balance_aux_loss', m.load_balance_weight * balance)
    if self.bias is not None and update_state:
      # Wang et al. 2024, Alg. 1: raise the bias of under-loaded experts, lower it for over-loaded ones.
      self.bias[...] = self.bias[...] + m.bias_update_rate * jnp.sign(jnp.mean(load_E) - load_E)
    return self._dispatch(x_BTD, idx_BTK, w_BTK.astype(self.dtype))

  def _expert_choice(self, x_BTD, scores_BTE):
    B, T, D = x_BTD.shape
    E, C = self.cfg.num_experts, capacity(B * T, self.model_cfg)
    w_EC, token_EC = jax.lax.top_k(scores_BTE.reshape(B * T, E).T, C)
    self.sow(nnx.Intermediate, 'expert_load', jnp.full((E,), 1 / E))
    expert_A = jnp.repeat(jnp.arange(E), C)
    token_A, weight_A = token_EC.reshape(-1), w_EC.reshape(-1).astype(self.dtype)
    x_ND = x_BTD.reshape(B * T, D)
    if self.cfg.execution == 'dropless':
      y_ND, _ = dropless(x_ND, expert_A, token_A, weight_A, self._experts(), E, self.kernel, None)
    else:
      y_ND, _ = capacity_limited(x_ND, expert_A, token_A, weight_A, self._experts(), E, C, None)
    chosen_N = jnp.zeros((B * T,), jnp.float32).at[token_A].set(1.0)
    return y_ND.reshape(B, T, D), 1.0 - jnp.mean(chosen_N)

  def _dispatch(self, x_BTD, idx_BTK, w_BTK):
    """Runs the assignments locally, or per device inside a train step (expert parallel if P > 1)."""
    mesh = sharding.active_mesh()
    experts = self._experts()
    if mesh is None:
      return self._run(x_BTD, idx_BTK, w_BTK, experts, None)
    P = mesh.shape['expert']
    x_spec = sharding.logical_to_spec(('batch', 'length', 'act_embed'), x_BTD.shape, mesh)
    # A device routes its own tokens: its rows, and its part of each row under context parallelism.
    route_spec = PartitionSpec(x_spec[0], x_spec[1], None)
    w_spec = PartitionSpec('expert' if P > 1 else None, None, None)
    split_axes = tuple(axis for entry in x_spec[:2] if entry is not None
                       for axis in ((entry,) if isinstance(entry, str) else entry))
    token_axes = split_axes + (('expert',) if P > 1 else ())
    if split_axes:
      # One copy of the experts per device holding other tokens, so the weights' gradient leaves the
      # shard_map unreduced and GSPMD sums it (once per step: a psum inside ran once per microbatch).
      copies = math.prod(mesh.shape[axis] for axis in split_axes)
      experts = tuple(jnp.broadcast_to(w[None], (copies, *w.shape)) for w in experts)
      w_spec = PartitionSpec(split_axes, *w_spec)

    def body(x_BTD, idx_BTK, w_BTK, *experts):
      b, T, D = x_BTD.shape
      if split_axes:
        experts = tuple(w[0] for w in experts)
      if P == 1:
        y_BTD, dropped = self._run(x_BTD, idx_BTK, w_BTK, experts, None)
      else:
        y_ND, dropped = self._run_rows(x_BTD.reshape(b * T, D), idx_BTK.reshape(b * T, -1),
                                       w_BTK.reshape(b * T, -1), experts, P)
        y_BTD = y_ND.reshape(b, T, D)
      if token_axes:
        dropped = jax.lax.pmean(dropped, token_axes)
      return y_BTD, dropped
    return jax.shard_map(body, in_specs=(x_spec, route_spec, route_spec) + (w_spec,) * 3,
                         out_specs=(x_spec, PartitionSpec()))(x_BTD, idx_BTK, w_BTK, *experts)

  def _run_rows(self, x_ND, idx_NK, w_NK, experts, P):
    """Expert parallel: the P devices of an expert group hold the same rows; each runs 1/P of them,
    then a psum puts the slices back together (a psum rather than an all-gather, so that shard_map
    knows the result is the same on every device of the group and transposes it correctly)."""
    N, D = x_ND.shape
    n, me = N // P, jax.lax.axis_index('expert')

    def take(a):
      return jax.lax.dynamic_slice_in_dim(a, me * n, n, axis=0)
    y_nD, dropped = self._run(take(x_ND)[None], take(idx_NK)[None], take(w_NK)[None], experts, 'expert')
    y_ND = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((N, D), y_nD.dtype), y_nD[0], me * n, axis=0)
    return jax.lax.psum(y_ND, 'expert'), dropped

  def _run(self, x_BTD, idx_BTK, w_BTK, experts, axis):
    B, T, D = x_BTD.shape
    N, K, E = B * T, idx_BTK.shape[-1], self.cfg.num_experts
    # Choice-major order, so first choices claim capacity before second ones (GShard).
    expert_A = idx_BTK.reshape(N, K).T.reshape(-1)
    weight_A = w_BTK.reshape(N, K).T.reshape(-1)
    token_A = jnp.tile(jnp.arange(N), K)
    x_ND = x_BTD.reshape(N, D)
    if self.cfg.execution == 'dropless':
      y_ND, dropped = dropless(x_ND, expert_A, token_A, weight_A, experts, E, self.kernel, axis)
    else:
      C = capacity(N, self.model_cfg)
      y_ND, dropped = capacity_limited(x_ND, expert_A, token_A, weight_A, experts, E, C, axis)
    return y_ND.reshape(B, T, D), dropped


def _as_distribution(scores_BTE):
  """Sigmoid scores normalised over the experts, so balance loss and entropy read as for softmax."""
  return scores_BTE / jnp.sum(scores_BTE, axis=-1, keepdims=True)


def _gmm(lhs_MK, rhs_GKN, sizes_G, kernel: str):
  """The grouped matmul, through the kernel `model.kernel` names ('xla' is jax.lax.ragged_dot)."""
  return grouped_matmul(lhs_MK, rhs_GKN, sizes_G.astype(jnp.int32), implementation=kernel)


def _swiglu_grouped(x_MD, sizes_G, experts, kernel):
  w_gate_GDF, w_up_GDF, w_down_GFD = experts
  h_MF = jax.nn.silu(_gmm(x_MD, w_gate_GDF, sizes_G, kernel)) * _gmm(x_MD, w_up_GDF, sizes_G, kernel)
  return _gmm(h_MF, w_down_GFD, sizes_G, kernel)


def _swiglu_batched(x_GCD, experts):
  w_gate_GDF, w_up_GDF, w_down_GFD = experts
  h_GCF = (jax.nn.silu(jnp.einsum('gcd,gdf->gcf', x_GCD, w_gate_GDF))
           * jnp.einsum('gcd,gdf->gcf', x_GCD, w_up_GDF))
  return jnp.einsum('gcf,gfd->gcd', h_GCF, w_down_GFD)


def dropless(x_ND, expert_A, token_A, weight_A, experts, num_experts: int, kernel: str, axis):
  """Every assignment (expert_A[a], token_A[a], weight_A[a]) runs: sort by expert, grouped matmuls,
  then each token sums its weighted results. `axis`: the mesh axis experts are split over, or None."""
  order_A = jnp.argsort(expert_A, stable=True)
  sizes_E = jnp.bincount(expert_A, length=num_experts)
  xs_AD = x_ND[token_A[order_A]]
  if axis is None:
    ys_AD = _swiglu_grouped(xs_AD, sizes_E, experts, kernel)
  else:
    ys_AD = _exchange_grouped(xs_AD, sizes_E, experts, kernel, axis)
  y_ND = jnp.zeros_like(x_ND).at[token_A[order_A]].add(ys_AD * weight_A[order_A][:, None])
  return y_ND, jnp.zeros((), jnp.float32)


def _exchange_grouped(xs_AD, sizes_E, experts, kernel, axis):
  """Dropless expert parallelism: rows sorted by (global) expert go to the device owning the expert,
  are regrouped there by local expert across senders, run, and come back in the same slots."""
  A, D = xs_AD.shape
  L = experts[0].shape[0]  # experts per device
  P = sizes_E.shape[0] // L
  sizes_PL = sizes_E.reshape(P, L)
  send_P = jnp.sum(sizes_PL, axis=1)
  start_P = jnp.cumsum(send_P) - send_P
  # Slot r of the buffer for device p holds sorted row start_P[p] + r; padded to A rows, the worst case.
  r_A = jnp.arange(A)
  valid_PA = r_A[None, :] < send_P[:, None]
  src_PA = jnp.minimum(start_P[:, None] + r_A[None, :], A - 1)
  send_PAD = jnp.where(valid_PA[:, :, None], xs_AD[src_PA], 0)
  recv_PAD = jax.lax.all_to_all(send_PAD, axis, 0, 0)
  recv_sizes_PL = jax.lax.all_to_all(sizes_PL, axis, 0, 0)
  # Row r from sender p belongs to local expert l where r crosses the sender's l-th group end;
  # padding rows get L and sort last, past the groups, where the grouped matmul gives zeros.
  ends_PL = jnp.cumsum(recv_sizes_PL, axis=1)
  local_PA = jnp.sum(r_A[None, :, None] >= ends_PL[:, None, :], axis=-1)
  order_M = jnp.argsort(local_PA.reshape(-1), stable=True)
  out_MD = _swiglu_grouped(recv_PAD.reshape(P * A, D)[order_M], jnp.sum(recv_sizes_PL, axis=0),
                           experts, kernel)
  back_PAD = jnp.zeros_like(out_MD).at[order_M].set(out_MD).reshape(P, A, D)
  ret_PAD = jax.lax.all_to_all(back_PAD, axis, 0, 0)
  dest_A = jnp.repeat(jnp.arange(P), send_P, total_repeat_length=A)
  return ret_PAD[dest_A, r_A - start_P[dest_A]]


def capacity_limited(x_ND, expert_A, token_A, weight_A, experts, num_experts: int, capacity: int, axis):
  """Each expert runs its first `capacity` assignments (in the given priority order) as one batched
  matmul over an [E, C, D] buffer; later ones are dropped. Returns the output and the dropped share."""
  N, D = x_ND.shape
  E, C = num_experts, capacity
  pos_A = _rank_within_expert(expert_A, E)
  keep_A = pos_A < C
  slot_A = jnp.where(keep_A, expert_A * C + pos_A, E * C)  # out of range: dropped by mode='drop'
  buf_ECD = jnp.zeros((E * C, D), x_ND.dtype).at[slot_A].set(x_ND[token_A], mode='drop').reshape(E, C, D)
  if axis is None:
    out_ECD = _swiglu_batched(buf_ECD, experts)
  else:
    L = experts[0].shape[0]
    P = E // L
    recv_PLCD = jax.lax.all_to_all(buf_ECD.reshape(P, L, C, D), axis, 0, 0)
    x_LMD = recv_PLCD.transpose(1, 0, 2, 3).reshape(L, P * C, D)
    out_PLCD = _swiglu_batched(x_LMD, experts).reshape(L, P, C, D).transpose(1, 0, 2, 3)
    out_ECD = jax.lax.all_to_all(out_PLCD, axis, 0, 0).reshape(E, C, D)
  y_AD = out_ECD.reshape(E * C, D).at[slot_A].get(mode='fill', fill_value=0)
  y_ND = jnp.zeros_like(x_ND).at[token_A].add(y_AD * weight_A[:, None])
  return y_ND, 1.0 - jnp.mean(keep_A.astype(jnp.float32))


def _rank_within_expert(expert_A, num_experts: int):
  """How many assignments to the same expert come before each one."""
  order_A = jnp.argsort(expert_A, stable=True)
  sizes_E = jnp.bincount(expert_A, length=num_experts)
  starts_E = jnp.cumsum(sizes_E) - sizes_E
  rank_sorted_A = jnp.arange(expert_A.shape[0]) - starts_E[expert_A[order_A]]
  return jnp.zeros_like(expert_A).at[order_A].set(rank_sorted_A)
