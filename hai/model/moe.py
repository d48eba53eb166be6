"""DeepSeekMoE: shared + fine-grained routed experts, sigmoid gates, group-limited top-k, aux-loss-free balancing.

The forward pass is split at the seams the parallel layer needs:

    route (router)  ->  dispatch (Dispatcher)  ->  experts (grouped GEMM)  ->  combine (Dispatcher)

``LocalDispatcher`` keeps everything on one device; the parallel layer provides the expert-parallel all-to-all one with
the same interface. Each dispatcher also exposes the seams *without* autograd (``dispatch_start``,
``combine_start`` and their backward counterparts, each returning a pending result), which the pipeline's
overlapped F&B (``hai.pipeline.overlap``) uses to keep one micro-batch's all-to-all in flight while another
micro-batch computes; ``MoE.front`` / ``MoE.expert_rows`` are the compute between those seams.

Legend: T tokens, D hidden, E routed experts (local: E_l), K experts per token, G groups, R dispatched rows (T*K
locally), F expert width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from hai.config import ModelConfig
from hai.model.grouped import expert_offsets, grouped_linear
from hai.model.layers import SwiGLU, swiglu
from hai.model.recompute import LinearOp, expert_ffn, norm_linears, swiglu_down
from hai.model.regions import LOCAL, Region
from hai.model.sequence import LOCAL_SEQ, SequenceSplit
from hai.model.wgrad import accumulate_wgrad, weight_grad_output

__all__ = ["Route", "Router", "Dispatcher", "LocalDispatcher", "GroupedExperts", "MoE", "Pending",
           "gather_rows", "scatter_rows"]


@dataclass
class Route:
    topk_idx: torch.Tensor  # (T, K) int64 global expert ids
    topk_weight: torch.Tensor  # (T, K) fp32 gates (normalized, scaled)
    scores: torch.Tensor  # (T, E) fp32 unbiased affinities (carry grad to the router)
    valid: torch.Tensor | None = None  # (T,) bool: positions that count (None: all; MTP's padding under SP)


def group_scores(g_TGe: torch.Tensor, rule: str, k: int, topk_group: int) -> torch.Tensor:
    """A group's score: ``topk_sum`` the sum of its top k/topk_group, ``sum_top2`` of its top 2 (V3), ``max`` its
    best expert (V2's group_limited_greedy)."""
    if rule == "max":
        return g_TGe.max(dim=-1).values
    return g_TGe.topk(2 if rule == "sum_top2" else k // topk_group, dim=-1).values.sum(-1)


def group_limited_mask(biased_TE: torch.Tensor, n_group: int, topk_group: int, k: int,
                       rule: str = "topk_sum") -> torch.Tensor:
    """Boolean (T, E) mask of experts *outside* the topk_group best groups (scored by ``rule``)."""
    T, E = biased_TE.shape
    g = biased_TE.view(T, n_group, E // n_group)
    group_score_TG = group_scores(g, rule, k, topk_group)
    keep_TG = group_score_TG.topk(topk_group, dim=-1).indices
    drop_TG = torch.ones(T, n_group, dtype=torch.bool, device=biased_TE.device).scatter_(1, keep_TG, False)
    return drop_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)


def _fp32_linear_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        dy32 = dy.reshape(-1, dy.shape[-1]).float()
        accumulate_wgrad(w, dy32.t() @ x.reshape(-1, x.shape[-1]).float())
        return (dy32 @ w.float()).to(x.dtype).reshape(x.shape)


class _Fp32Linear(torch.autograd.Function):
    """y = x Wᵀ computed in fp32; keeps x in its own dtype; W's gradient accumulated in fp32."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        ctx.weight = w  # the Parameter itself (a saved tensor may come back as another object, e.g. recomputed)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), w.float())

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        w = ctx.weight
        with torch.autocast(x.device.type, enabled=False):
            dy32 = dy.reshape(-1, dy.shape[-1]).float()
            dw = weight_grad_output(w, dy32.t() @ x.reshape(-1, x.shape[-1]).float())
            return (dy32 @ w.float()).to(x.dtype).reshape(x.shape), dw


class Router(nn.Module):
    """Affinities s = sigmoid(x Wᵀ) (or softmax); top-k on s + bias; gates from unbiased s, normalized over the k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        # Aux-loss-free balancing bias: not trained by the optimizer, updated by update_bias().
        self.register_buffer("bias", torch.zeros(E, dtype=torch.float32))
        # Tokens routed to each expert since the last bias update (this rank's micro-batches only).
        self.register_buffer("load", torch.zeros(E, dtype=torch.float32), persistent=False)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """x Wᵀ in fp32 whatever the autocast or weight dtype (routing in V3's precision); keeps x as given."""
        return _Fp32Linear.apply(x_TD, self.weight)

    def logits_backward(self, x_TD: torch.Tensor, d_logits: torch.Tensor) -> torch.Tensor:
        """dx of :meth:`logits` for a recompute region (the weight gradient goes straight to main_grad / .grad)."""
        return _fp32_linear_backward(x_TD, self.weight, d_logits)

    def route(self, logits_TE: torch.Tensor) -> Route:
        """Affinities, top-k on affinity + bias (group-limited), normalized gates."""
        cfg = self.cfg
        scores_TE = logits_TE.sigmoid() if cfg.score_func == "sigmoid" else logits_TE.softmax(dim=-1)
        with torch.no_grad():
            biased = scores_TE.detach() + self.bias
            if cfg.n_group > 1:
                drop = group_limited_mask(biased, cfg.n_group, cfg.topk_group, cfg.n_activated_experts,
                                          cfg.group_scoring)
                biased = biased.masked_fill(drop, float("-inf"))
            topk_idx_TK = biased.topk(cfg.n_activated_experts, dim=-1).indices
        w_TK = scores_TE.gather(1, topk_idx_TK)
        if cfg.norm_topk_prob:
            w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
        return Route(topk_idx_TK, w_TK * cfg.route_scale, scores_TE)

    @torch.no_grad()
    def count(self, route: Route) -> None:
        """Add a routed micro-batch's tokens to the per-expert load (training only; once per forward, also when the
        forward is recomputed)."""
        if self.training:  # scatter-add, not bincount (which sizes its output from the data: a host sync)
            idx = route.topk_idx.flatten()
            ones = torch.ones_like(idx, dtype=self.load.dtype) if route.valid is None else \
                route.valid.to(self.load.dtype)[:, None].expand_as(route.topk_idx).reshape(-1)
            self.load.index_add_(0, idx, ones)

    def forward(self, x_TD: torch.Tensor) -> Route:
        route = self.route(self.logits(x_TD))
        self.count(route)
        return route

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, gamma: float) -> None:
        """b_i += gamma * sign(mean_load - load_i): push load toward the mean (Wang et al. 2024; DeepSeek-V3)."""
        self.bias += gamma * torch.sign(load_E.mean() - load_E)


class Pending:
    """A seam's result (dispatch, combine or their gradients); ``wait()`` completes it (once) and returns it.

    The local dispatcher's results are already there (:meth:`done`). The parallel layer's expert-parallel ones are
    in flight: a transfer of several hops (hierarchical dispatch) can only issue hop k+1 once hop k has arrived;
    ``step()`` waits for the hop in flight and issues the next one, returning True while one is in flight, so a
    caller with other work can interleave it between the hops; ``ready()`` says whether ``step``/``wait`` would block
    the host; ``wait()`` runs the remaining steps (its subclasses ``Chain`` and ``Joint`` live with the collectives).
    """

    host_blocking = True  # whether wait() blocks the host (gloo) or is only a stream dependency (NCCL)

    def __init__(self, finish: Callable[[], Any]):
        self._finish, self._result = finish, None

    @classmethod
    def done(cls, value: Any) -> "Pending":
        out = cls(None)
        out._result = value
        return out

    def step(self) -> bool:
        return False

    def ready(self) -> bool:
        """Whether the part in flight has arrived (``wait``/``step`` would not block on it)."""
        return True

    def wait(self) -> Any:
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        return self._result


class Dispatcher(Protocol):
    """The MoE communication seams. ``dispatch`` returns rows grouped by (local) expert; ``combine`` inverts it and
    applies the gates: y_t = sum_k w_tk * expert_out[row(t, k)].

    The same seams without autograd, for code that drives the backward itself (the pipeline's overlapped F&B): the
    dispatch moves N buffer rows of x and of the K gates; ``gather_rows`` picks the R expert rows out of them;
    ``scatter_rows`` gates and pre-sums the expert outputs back into N rows, which the combine returns to the tokens.
    Each ``*_start`` issues its communication and returns a :class:`Pending` result (already done locally).
    """

    num_local_experts: int

    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 topk_weight_TK: torch.Tensor) -> tuple[torch.Tensor, list[int], Any]: ...

    def combine(self, y_RD: torch.Tensor, handle: Any, gated: bool = False) -> torch.Tensor: ...

    def dispatch_start(self, x_TD, topk_idx_TK, topk_weight_TK) -> tuple[Any, Any]: ...  # -> (x_ND, w_NK)

    def dispatch_backward_start(self, g_x_ND, g_w_NK, handle) -> Any: ...  # -> (g_x_TD, g_w_TK)

    def combine_start(self, z_ND, handle) -> Any: ...  # -> out_TD

    def combine_backward_start(self, g_out_TD, handle) -> Any: ...  # -> g_z_ND


def gather_rows(x_ND: torch.Tensor, w_NK: torch.Tensor, handle) -> tuple[torch.Tensor, torch.Tensor]:
    """The R expert rows of a dispatched buffer and their gates (autograd ops)."""
    return x_ND.index_select(0, handle.row_R), w_NK[handle.row_R, handle.slot_R]


def scatter_rows(y_RD: torch.Tensor, w_R: torch.Tensor | None, handle) -> torch.Tensor:
    """Gate the expert outputs (unless ``w_R`` is None: rows already gated) and sum them per buffer row:
    z_N = sum_{r -> N} w_r y_r (autograd ops)."""
    weighted_RD = y_RD if w_R is None else y_RD * w_R.unsqueeze(-1).to(y_RD.dtype)
    # index_put(accumulate) keeps only the row index for its backward (index_add would also keep the rows)
    return y_RD.new_zeros(handle.num_rows, y_RD.shape[1]).index_put((handle.row_R,), weighted_RD, accumulate=True)


@dataclass
class _LocalHandle:
    row_R: torch.Tensor  # (R,) source token of each dispatched row (the buffer rows are the tokens: N = T)
    slot_R: torch.Tensor  # (R,) its k in the token's top-k
    weight_R: torch.Tensor  # (R,) gate of each row
    tokens_per_local_expert: list[int]
    num_rows: int  # N = T


class LocalDispatcher:
    """Single-device dispatcher: a stable sort of (token, k) slots by expert id."""

    def __init__(self, num_experts: int):
        self.num_local_experts = num_experts

    def _plan(self, topk_idx_TK, topk_weight_TK) -> _LocalHandle:
        K = topk_idx_TK.shape[1]
        flat = topk_idx_TK.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.num_local_experts, dtype=torch.long, device=flat.device)
        counts = counts.index_add_(0, flat, torch.ones_like(flat)).tolist()  # the dispatch's one host sync
        return _LocalHandle(order // K, order % K, topk_weight_TK.flatten()[order], counts, topk_idx_TK.shape[0])

    def dispatch(self, x_TD, topk_idx_TK, topk_weight_TK):
        handle = self._plan(topk_idx_TK, topk_weight_TK)
        return x_TD[handle.row_R], handle.tokens_per_local_expert, handle

    def combine(self, y_RD, handle: _LocalHandle, gated: bool = False):
        return scatter_rows(y_RD, None if gated else handle.weight_R, handle)

    # seams without autograd: nothing moves on one device
    def dispatch_start(self, x_TD, topk_idx_TK, topk_weight_TK):
        w_TK = topk_weight_TK.detach()
        return self._plan(topk_idx_TK, w_TK), Pending.done((x_TD.detach(), w_TK))

    def dispatch_backward_start(self, g_x_ND, g_w_NK, handle):
        return Pending.done((g_x_ND, g_w_NK))

    def combine_start(self, z_ND, handle):
        return Pending.done(z_ND.detach())

    def combine_backward_start(self, g_out_TD, handle):
        return Pending.done(g_out_TD)


class GroupedExperts(nn.Module):
    """E_l SwiGLU experts with stacked weights (nn.Linear convention: out x in) over rows grouped by expert."""

    def __init__(self, num_experts: int, dim: int, inter: int, fp8: bool = False):
        super().__init__()
        self.num_experts, self.fp8 = num_experts, fp8
        self.expert_offset = 0  # global id of local expert 0 (set by the parallel layer's shard_experts)
        self.wgrad_store = None  # set by the pipeline for the zero-bubble weight-gradient split
        self.w1 = nn.Parameter(torch.empty(num_experts, inter, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, inter, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, inter))

    def forward(self, x_RD: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """Ungated expert outputs (autograd keeps x, the SwiGLU inputs and output; the caller gates)."""
        if self.fp8:
            from hai.kernels import fp8_grouped_linear as gl

            h = swiglu(gl(x_RD, self.w1, tokens_per_expert), gl(x_RD, self.w3, tokens_per_expert))
            return gl(h, self.w2, tokens_per_expert)
        offs = expert_offsets(tokens_per_expert, x_RD.device)  # one host-to-device copy for the three GEMMs
        store = self.wgrad_store

        def linear(x, w):
            return grouped_linear(x, w, tokens_per_expert, offs, store)

        return linear(swiglu(linear(x_RD, self.w1), linear(x_RD, self.w3)), self.w2)

    def gated(self, x_RD: torch.Tensor, w_R: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """Gated expert outputs under V3's recipe (``hai.model.recompute.expert_ffn``): keeps x, the SwiGLU inputs
        and the gates; the gate gradient comes from <W2ᵀ·dy, s>, not from kept output rows."""
        return expert_ffn(self, x_RD, w_R, tokens_per_expert)


class _InjectAuxLoss(torch.autograd.Function):
    """Identity on x whose backward also back-propagates ``scale * d(aux)/d(aux) = scale`` into aux.

    This puts the sequence-wise balance loss into the gradient without threading it through every pipeline stage.
    """

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.aux_shape, ctx.scale, device=grad.device), None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        fp8 = cfg.precision == "fp8"
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, fp8)
        self.shared = (SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size, fp8)
                       if cfg.n_shared_experts > 0 else None)
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.n_routed_experts)
        self.recompute = "none"  # none | v3 | full (hai.model.recompute; set by Transformer.set_recompute)
        self.aux_grad_scale = 1.0  # set by the trainer to the micro-batch loss scale (1 / micro-batches)
        self.tp: Region = LOCAL  # hai.model.regions; under TP (always with SP) this rank routes its sequence shard
        self.cp: SequenceSplit = LOCAL_SEQ  # hai.model.sequence; under CP this rank routes its positions
        self.valid_len = None  # MTP under SP/CP: positions >= valid_len are padding (not counted, no balance loss)

    def seq_aux_loss(self, route: Route, batch: int) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence, averaged over sequences (DeepSeek-V3 eq. 17-20)."""
        cfg = self.cfg
        E, K = cfg.n_routed_experts, cfg.n_activated_experts
        s_BSE = route.scores.view(batch, -1, E)
        S = s_BSE.shape[1]
        s_norm = s_BSE / s_BSE.sum(-1, keepdim=True)
        hit = torch.ones(batch, S * K, device=s_BSE.device)
        if route.valid is not None:  # padded positions (MTP under SP) take no part
            v_BS = route.valid.view(batch, S).to(s_norm.dtype)
            s_norm = s_norm * v_BS.unsqueeze(-1)
            hit = v_BS[:, :, None].expand(batch, S, K).reshape(batch, S * K)
        P_BE = s_norm.sum(1)
        hits = torch.zeros(batch, E, device=s_BSE.device).scatter_add_(1, route.topk_idx.view(batch, -1), hit)
        # sequence-sharded (TP with SP, CP): the per-sequence sums over every TP and CP rank's positions
        P_BE, hits, S = self.tp.sum(P_BE), self.tp.sum_(hits), S * self.tp.size
        P_BE, hits, S = self.cp.sum(P_BE), self.cp.sum_(hits), S * self.cp.size
        if route.valid is not None:
            S = self.valid_len
        P_BE = P_BE / S
        f_BE = hits * (E / (K * S))
        return cfg.seq_aux_alpha * (f_BE * P_BE).sum(-1).mean()

    # --- the compute between the seams (Block.forward and the pipeline's overlapped F&B both use these) ---
    def _mark_valid(self, route: Route, batch: int) -> Route:
        """Positions beyond ``valid_len`` (global, along this rank's sequence shard) are padding."""
        if self.valid_len is None:
            return route
        S = route.scores.shape[0] // batch
        first = self.tp.rank * S  # this TP rank's shard of the CP rank's positions
        pos = self.cp.positions(S * self.tp.size, route.scores.device)[first:first + S]
        route.valid = (pos < self.valid_len).expand(batch, S).reshape(-1)
        return route

    def _aux(self, route: Route, batch: int) -> torch.Tensor | None:
        route = self._mark_valid(route, batch)
        if self.training and self.cfg.seq_aux_alpha > 0 and torch.is_grad_enabled():
            return self.seq_aux_loss(route, batch)
        return None

    def front(self, x_BSD: torch.Tensor, norm: nn.Module | None = None):
        """Everything before the dispatch: (x_TD, route, aux loss or None, shared-expert output or None).

        ``x_BSD`` is the normed input, or with ``norm`` the norm's input: then the norm, the router and the shared
        expert's up-projections run as one V3 recompute region (``recompute='v3'``) that keeps only that input."""
        B = x_BSD.shape[0]
        if norm is None or self.recompute != "v3":
            x_TD = (x_BSD if norm is None else norm(x_BSD)).reshape(-1, x_BSD.shape[-1])
            route = self.router.route(self.router.logits(x_TD))
            if self.shared is None:
                shared = None
            elif not self.tp.split:
                shared = self.shared(x_TD)
            else:  # TP-split shared experts: enter/exit along the (sharded) sequence, so (B, S/tp, D) in and out
                shared = self.shared(x_TD.view(B, -1, x_TD.shape[-1])).reshape(x_TD.shape)
            return x_TD, route, self._aux(route, B), shared
        r = self.router
        ops = [LinearOp(r.logits, r.logits_backward, r.weight)]
        if self.shared is not None and not self.tp.split:
            ops += [LinearOp(m.forward, m.backward, m.weight) for m in (self.shared.w1, self.shared.w3)]
        x, logits, *h = norm_linears([x_BSD], [norm], ops, keep_norm=True)
        if self.tp.split:  # TP (SP): the shared experts' region takes the gathered residual, norm inside
            x_TD = x.reshape(-1, x.shape[-1])
            route = r.route(logits.reshape(-1, logits.shape[-1]))
            shared = None
            if self.shared is not None:
                sh = self.shared
                h1, h3 = norm_linears([self.tp.enter(x_BSD)], [norm], [LinearOp(m.forward, m.backward, m.weight)
                                                                       for m in (sh.w1, sh.w3)])
                w2 = LinearOp(sh.w2.forward, sh.w2.backward, sh.w2.weight)
                out = self.tp.exit(swiglu_down(h1, h3, w2, self.cfg.precision == "fp8"))
                shared = out.reshape(-1, out.shape[-1])
            return x_TD, route, self._aux(route, B), shared
        x_TD = x.reshape(-1, x.shape[-1])
        route = r.route(logits.reshape(-1, logits.shape[-1]))
        shared = None
        if self.shared is not None:
            w2 = self.shared.w2
            fp8 = self.cfg.precision == "fp8"
            shared = swiglu_down(*h, LinearOp(w2.forward, w2.backward, w2.weight), fp8)
            shared = shared.reshape(-1, shared.shape[-1])
        return x_TD, route, self._aux(route, B), shared

    def _gated_rows(self, x_RD: torch.Tensor, w_R: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """w_r * expert_r(x_r): ``none`` keeps the output rows for the gate's gradient, ``v3`` forms it from
        <W2ᵀ·dy, s> (``GroupedExperts.gated``), ``full`` recomputes the experts from x and w in the backward."""
        if self.recompute == "v3":
            return self.experts.gated(x_RD, w_R, counts)

        def run(x, w):
            return self.experts(x, counts) * w.unsqueeze(-1).to(x.dtype)

        if self.recompute == "full" and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(run, x_RD, w_R, use_reentrant=False)
        return run(x_RD, w_R)

    def expert_rows(self, x_ND: torch.Tensor, w_NK: torch.Tensor, handle) -> torch.Tensor:
        """Routed experts on a dispatched buffer: pick the expert rows, run the experts, gate and pre-sum (z_ND)."""
        x_RD, w_R = gather_rows(x_ND, w_NK, handle)
        return scatter_rows(self._gated_rows(x_RD, w_R, handle.tokens_per_local_expert), None, handle)

    def routed(self, x_TD: torch.Tensor, route: Route) -> torch.Tensor:
        """Dispatch, routed experts and combine through the dispatcher's autograd seams: out_TD."""
        recv_RD, counts, handle = self.dispatcher.dispatch(x_TD, route.topk_idx, route.topk_weight)
        return self.dispatcher.combine(self._gated_rows(recv_RD, handle.weight_R, counts), handle, gated=True)

    def finish(self, out_TD: torch.Tensor, shared: torch.Tensor | None, aux: torch.Tensor | None) -> torch.Tensor:
        """Add the shared expert and inject the balance loss's gradient."""
        if shared is not None:
            out_TD = out_TD + shared
        if aux is not None:
            out_TD = _InjectAuxLoss.apply(out_TD, aux, self.aux_grad_scale)
        return out_TD

    def forward(self, x_BSD: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        x_TD, route, aux, shared = self.front(x_BSD, norm)
        self.router.count(route)
        return self.finish(self.routed(x_TD, route), shared, aux).view(*x_BSD.shape[:-1], -1)
