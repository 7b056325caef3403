"""The hooks of one ``with run(...)`` block.

A forward hook projects each watched module's input activations (``a P_in``) and
registers a tensor hook on its output; when the gradient arrives the tensor hook
projects it (``g P_out``) and adds ``sum_t (g_t P_out)^T (a_t P_in)`` to the
example's gradient with one batched matmul. The full ``d_out x d_in`` gradient is
never formed. Hooks return ``None``, so the model's outputs and parameter
gradients are exactly those of an uninstrumented run.

For projected modules (the usual case) the tensor hook only projects the gradient
and keeps ``(g P_out, a P_in)``; ``finish`` then forms the per-example gradients and
the covariances of all modules of one shape together (a few batched matmuls for the
whole model instead of a dozen small operations per module, which dominate the cost
of the capture at small ranks). Unprojected modules (``projection: none``, the PCA
covariance pass) and per-token capture reduce in the tensor hook, so that the large
full-space tensors are freed as the backward pass goes.

All hooks (the forward hooks and the tensor hooks they register) form one
:class:`~logix.capture.hooks.HookSet`: attached on ``attach`` (idempotent) and all removed on
``detach``, also when the block raises; ``with capture:`` does both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logix.capture.hooks import HookSet
from logix.capture.layers import LayerAdapter, LayerShape
from logix.capture.spec import PassSpec, Space
from logix.core.projection import ModuleProjection
from logix.errors import BatchError, CaptureError


@dataclass
class Watched:
    """A module the run captures.

    Attributes:
        name: Its name in the model (``named_modules``, without the prefixes FSDP, activation
            checkpointing or ``torch.compile`` wrappers add).
        module: The module.
        adapter: How its activations and output gradients are read.
        shape: Its canonical sizes.
    """

    name: str
    module: nn.Module
    adapter: LayerAdapter
    shape: LayerShape


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread.

    A watched module's forward that runs then is activation checkpointing recomputing it.
    """
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


# Stacked (g P_out, a P_in) of the modules reduced together in ``finish`` stay below this.
_GROUP_BYTES = 256 * 2**20


@dataclass
class _ModuleState:
    pending: dict[int, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    deferred: list[tuple[Tensor, Tensor, Tensor | None]] = field(default_factory=list)  # (gp, ap, w)
    calls: int = 0
    grads_seen: int = 0
    no_grad_calls: int = 0  # forwards without gradient: reentrant checkpointing recomputes them
    grad: Tensor | None = None  # (B, k_out, k_in)
    token_grad: Tensor | None = None  # (B, T, k_out, k_in)
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class BatchResult:
    """What one block captured, before the run filters and stores it."""

    grads: dict[str, Tensor]  # module -> (B, k_out, k_in), zeros for modules that did not run
    token_grads: dict[str, Tensor] | None  # module -> (B, T, k_out, k_in) in per-token mode
    stats: dict[str, dict[str, Tensor]]  # module -> {"A", "S", "tokens"} batch sums


class BatchCapture:
    """Hooks and per-batch buffers for one block (made by the ``with run(...)`` block).

    Args:
        watched: The modules captured.
        projections: Module name to its projection (identities in a full-space pass).
        spec: What this pass computes.
        batch_size: The number of examples (``len(data_id)``), when known.
        mask: ``(batch, seq_len)`` 0/1 tensor of the tokens that count.
        keep: ``(batch,)`` booleans of the examples to capture (ids already committed are skipped).
        compute_dtype: The dtype the hooks compute projections in.
        grad_scale: Multiplies the captured gradients: undoes the loss's reduction (a mean over
            ``N``: ``N``).
    """

    def __init__(
        self,
        watched: list[Watched],
        projections: dict[str, ModuleProjection],
        spec: PassSpec,
        batch_size: int | None,
        mask: Tensor | None,
        keep: Tensor | None,
        compute_dtype: torch.dtype,
        grad_scale: float = 1.0,
    ) -> None:
        self.watched = watched
        self.grad_scale = grad_scale  # undoes the loss's reduction (a mean over N: N)
        self.projections = projections
        self.spec = spec
        self.batch_size = batch_size
        self.mask = None if mask is None else mask.to(torch.bool)
        self.keep = keep
        self.dtype = compute_dtype
        self.state = {w.name: _ModuleState() for w in watched}
        self.hooks = HookSet(self._register)
        self._weights: dict[tuple, Tensor | None] = {}
        self._counts: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (weights, count)
        self._token_shape: tuple[int, ...] | None = None
        self._saw_batch = False  # a module received the batch of len(data_id) examples
        # projected on both sides and not per token: reduced in batches by ``finish``
        self._defer = {
            w.name: projections[w.name].p_in is not None and projections[w.name].p_out is not None
            and not spec.per_token
            for w in watched
        }

    # ---- lifecycle --------------------------------------------------------------------
    def _register(self, hooks: HookSet) -> None:
        for w in self.watched:
            hooks.add(w.module.register_forward_hook(functools.partial(self._forward_hook, w)))

    def attach(self) -> BatchCapture:
        """Register the forward hooks on the watched modules (once; again after ``detach``)."""
        self.hooks.attach()
        return self

    def detach(self) -> None:
        """Remove every hook (forward and tensor hooks) and drop the activations still held."""
        try:
            self.hooks.detach()
        finally:
            for st in self.state.values():
                st.pending.clear()
                st.deferred.clear()

    def __enter__(self) -> BatchCapture:
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.detach()

    # ---- weights (mask x keep) --------------------------------------------------------
    def _token_weights(self, name: str, tok: tuple[int, ...], device: torch.device) -> Tensor | None:
        """``(B, T)`` 0/1 weights in the compute dtype for a module whose token dims are ``tok``
        (None: all ones); built once per block for each token shape."""
        key = (tok, device)
        if key in self._weights:
            return self._weights[key]
        weights = None
        if self.mask is not None and tok:
            if tuple(self.mask.shape[1:]) != tok:
                raise BatchError(
                    f"mask has shape {tuple(self.mask.shape)} but module {name!r} sees tokens of "
                    f"shape {(self.mask.shape[0], *tok)}. Pass a (batch, seq_len) mask that matches "
                    "the model input, or no mask."
                )
            weights = self.mask.reshape(self.mask.shape[0], -1).to(device)
        if self.keep is not None:
            keep = self.keep.to(device)
            t = 1 if not tok else int(torch.tensor(tok).prod())
            keep = keep[:, None].expand(-1, t)
            weights = keep if weights is None else weights & keep
        if weights is not None:
            weights = weights.to(self.dtype)
        self._weights[key] = weights
        return weights

    def _token_count(self, weights: Tensor | None, n: int) -> Tensor:
        """The number of weighted tokens as a float64 scalar (``n`` when ``weights`` is None)."""
        if weights is None:
            return torch.tensor(float(n), dtype=torch.float64)
        cached = self._counts.get(id(weights))
        if cached is None or cached[0] is not weights:
            cached = self._counts[id(weights)] = (weights, weights.sum(dtype=torch.float64).cpu())
        return cached[1]

    # ---- hooks ------------------------------------------------------------------------
    def _forward_hook(self, w: Watched, module: nn.Module, inputs: tuple, output: object) -> Tensor | None:
        st = self.state[w.name]
        if not isinstance(output, Tensor) or not output.requires_grad:
            if not torch.is_grad_enabled():
                st.no_grad_calls += 1  # maybe the first forward of a reentrant checkpoint
            return  # no gradient will reach this call (no_grad, frozen branch)
        if _in_backward():  # activation checkpointing recomputes the forward during backward
            if st.no_grad_calls == 0:
                return  # non-reentrant: this call was captured when it first ran
            st.no_grad_calls -= 1  # reentrant: the gradient flows through this recomputation
        batch = output.shape[0]
        broadcast = False
        if self.batch_size is not None and batch == self.batch_size:
            self._saw_batch = True
        if self.batch_size is not None and batch != self.batch_size:
            # a batch of 1 is broadcast only when shared by a real batch seen before it in this block
            if batch != 1 or output.dim() < 2 or not self._saw_batch:
                raise BatchError(
                    f"data_id has {self.batch_size} ids but module {w.name!r} received a batch of "
                    f"{batch}. Pass one id per example (batch-first inputs)."
                )
            # Shared across the batch (e.g. GPT-2 position embeddings, position_ids of shape
            # (1, T)): hand the model an expanded view so the output gradient stays per example.
            broadcast, batch = True, self.batch_size
        proj = self.projections[w.name]
        with torch.no_grad():  # no graph (and nothing saved for a checkpoint) for the capture's own work
            ap = w.adapter.project_activations(module, inputs, proj, self.dtype)
        if broadcast:
            ap = ap.expand(batch, *ap.shape[1:])
            output = output.expand(batch, *output.shape[1:])
        tok = tuple(ap.shape[1:-1])
        self._check_per_token(w.name, tok)
        ap = ap.reshape(batch, -1, ap.shape[-1])
        weights = self._token_weights(w.name, tok, ap.device)
        if weights is not None and not self._defer[w.name]:
            ap = ap * weights.unsqueeze(-1)
        call = st.calls
        st.calls += 1
        st.pending[call] = (ap, weights)
        hook = functools.partial(self._grad_hook, w, call)
        self.hooks.add(output.register_hook(hook))
        return output if broadcast else None

    def _grad_hook(self, w: Watched, call: int, grad: Tensor) -> None:
        st = self.state[w.name]
        if call not in st.pending:
            return  # hooks were detached, or a second backward through the same graph
        ap, weights = st.pending.pop(call)
        st.grads_seen += 1
        g = w.adapter.output_grad(w.module, grad)
        g = g.reshape(ap.shape[0], -1, g.shape[-1]).to(self.dtype)
        if self.grad_scale != 1.0:
            g = g * self.grad_scale
        proj = self.projections[w.name]
        gp = g if proj.p_out is None else F.linear(g, proj.prepared(g.device, self.dtype, w.shape.bias).out_weight)
        if self._defer[w.name]:
            st.deferred.append((gp, ap, weights))  # unmasked: ``finish`` masks the whole group
            return None
        if weights is not None:
            gp = gp * weights.unsqueeze(-1)
        if self.spec.gradients:
            contrib = torch.bmm(gp.transpose(1, 2), ap)
            st.grad = contrib if st.grad is None else st.grad + contrib
            if self.spec.per_token:
                tokens = gp.unsqueeze(-1) * ap.unsqueeze(-2)
                st.token_grad = tokens if st.token_grad is None else st.token_grad + tokens
        if self.spec.covariance:
            self._accumulate_covariance(w, st, ap, gp, weights)
        return None

    def _accumulate_covariance(
        self, w: Watched, st: _ModuleState, ap: Tensor, gp: Tensor, weights: Tensor | None
    ) -> None:
        a_flat = ap.reshape(-1, ap.shape[-1])
        g_flat = gp.reshape(-1, gp.shape[-1])
        one_hot = self.spec.space is Space.FULL and w.adapter.kind == "embedding"
        cov_a = torch.diag(a_flat.sum(0)) if one_hot else a_flat.T @ a_flat
        n = self._token_count(weights, a_flat.shape[0])
        for key, value in (("A", cov_a), ("S", g_flat.T @ g_flat), ("tokens", n)):
            value = value.detach().to("cpu", torch.float64)
            st.stats[key] = value if key not in st.stats else st.stats[key] + value

    # ---- batched reduction of the projected modules ---------------------------------------
    def _reduce_deferred(self) -> None:
        """Per-example gradients and covariances of every deferred module, grouped by shape."""
        groups: dict[tuple, list[tuple[str, Tensor, Tensor, Tensor | None]]] = {}
        for name, st in self.state.items():
            if not st.deferred:
                continue
            items, st.deferred = st.deferred, []
            gp, ap, weights = items[0]
            if len(items) > 1:  # a module called several times: its calls' tokens add up alike
                gp = torch.cat([i[0] for i in items], dim=1)
                ap = torch.cat([i[1] for i in items], dim=1)
                if any(i[2] is not None for i in items):
                    weights = torch.cat([gp.new_ones(i[0].shape[:2]) if i[2] is None else i[2] for i in items], dim=1)
            groups.setdefault((tuple(gp.shape), tuple(ap.shape), gp.device), []).append((name, gp, ap, weights))
        for members in groups.values():
            each = (members[0][1].numel() + members[0][2].numel()) * members[0][1].element_size()
            step = max(1, _GROUP_BYTES // max(each, 1))
            for lo in range(0, len(members), step):
                self._reduce_group(members[lo : lo + step])

    def _reduce_group(self, members: list[tuple[str, Tensor, Tensor, Tensor | None]]) -> None:
        """One stack of same-shape modules: ``G_b = sum_t w_t (g_t P_out)^T (a_t P_in)``, A and S."""
        names = [m[0] for m in members]
        gp = torch.stack([m[1] for m in members])  # (M, B, T, k_out)
        ap = torch.stack([m[2] for m in members])  # (M, B, T, k_in)
        ws = [m[3] for m in members]
        if all(x is None for x in ws):
            weights = None
        elif all(x is ws[0] for x in ws):
            weights = ws[0].unsqueeze(-1)  # (B, T, 1), broadcast over the modules
        else:
            weights = torch.stack([gp.new_ones(gp.shape[1:3]) if x is None else x for x in ws]).unsqueeze(-1)
        if weights is not None:
            ap = ap * weights  # 0/1 weights: masking one factor of each product masks the product
        if self.spec.gradients:
            grads = torch.matmul(gp.transpose(-1, -2), ap)  # (M, B, k_out, k_in)
            for i, name in enumerate(names):
                st = self.state[name]
                st.grad = grads[i] if st.grad is None else st.grad + grads[i]
        if self.spec.covariance:
            m = len(names)
            a_flat = ap.reshape(m, -1, ap.shape[-1])
            g_flat = (gp if weights is None else gp * weights).reshape(m, -1, gp.shape[-1])
            cov_a = torch.matmul(a_flat.transpose(1, 2), a_flat).detach().to("cpu", torch.float64)
            cov_s = torch.matmul(g_flat.transpose(1, 2), g_flat).detach().to("cpu", torch.float64)
            if weights is None or weights.dim() == 3:
                counts = [self._token_count(ws[0], a_flat.shape[1])] * m
            else:
                counts = list(weights.sum(dim=(1, 2, 3), dtype=torch.float64).cpu())
            for i, name in enumerate(names):
                stats = self.state[name].stats
                for key, value in (("A", cov_a[i]), ("S", cov_s[i]), ("tokens", counts[i])):
                    stats[key] = value if key not in stats else stats[key] + value

    def _check_per_token(self, name: str, tok: tuple[int, ...]) -> None:
        if not self.spec.per_token:
            return
        if self._token_shape is None:
            self._token_shape = tok
        if tok != self._token_shape or not tok:
            raise CaptureError(
                f"Per-token capture needs every watched module to see the same token dimensions; "
                f"module {name!r} sees {tok or '(no token dimension)'} but another saw "
                f"{self._token_shape}. Exclude it (capture.exclude) or disable capture.per_token."
            )

    # ---- result -----------------------------------------------------------------------
    def finish(self) -> BatchResult:
        """Check that every call got its gradient and return the batch's buffers."""
        missing = [n for n, st in self.state.items() if st.pending]
        if missing:
            raise CaptureError(
                f"Modules {missing} ran forward inside this block but no gradient reached them. "
                "Call loss.backward() inside the `with run(...)` block, once per forward."
            )
        if not any(st.grads_seen for st in self.state.values()):
            raise CaptureError(
                "No gradient reached any watched module in this block. Run forward with "
                "gradients enabled and call loss.backward() inside the `with run(...)` block."
            )
        self._reduce_deferred()
        grads: dict[str, Tensor] = {}
        token_grads: dict[str, Tensor] | None = {} if self.spec.per_token else None
        if self.spec.gradients:
            for w in self.watched:
                st = self.state[w.name]
                grads[w.name] = st.grad if st.grad is not None else self._zeros(w, st)
                if token_grads is not None:
                    token_grads[w.name] = st.token_grad if st.token_grad is not None else None
            if token_grads is not None:
                token_grads = self._fill_token_zeros(token_grads)
        stats = {n: st.stats for n, st in self.state.items() if st.stats}
        return BatchResult(grads, token_grads, stats)

    def _zeros(self, w: Watched, st: _ModuleState) -> Tensor:
        proj = self.projections[w.name]
        k_out = proj.k_out or w.shape.d_out
        k_in = proj.k_in or w.shape.d_in_aug
        batch = self.batch_size or next(g.shape[0] for s in self.state.values() if (g := s.grad) is not None)
        return torch.zeros(batch, k_out, k_in, dtype=self.dtype)

    def _fill_token_zeros(self, token_grads: dict[str, Tensor | None]) -> dict[str, Tensor]:
        ref = next(t for t in token_grads.values() if t is not None)
        out = {}
        for w in self.watched:
            t = token_grads[w.name]
            if t is None:
                proj = self.projections[w.name]
                k_out = proj.k_out or w.shape.d_out
                k_in = proj.k_in or w.shape.d_in_aug
                t = ref.new_zeros(ref.shape[0], ref.shape[1], k_out, k_in)
            out[w.name] = t
        return out
