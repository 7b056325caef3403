"""Non-finite values (a NaN loss, an overflow) never enter a run silently (``capture.nonfinite``).

After a block's backward pass, before anything of it is added to the run, the rows of every
example and the batch's statistics are checked. With ``error`` (the default) a batch holding NaN
/ Inf is refused with a :class:`~logix.errors.BatchError` naming its ids; nothing of it is kept
(statistics included) and everything committed earlier stays. With ``skip`` the non-finite
examples are dropped (their ids recorded in ``run.json``'s ``skipped_nonfinite``), a batch whose
statistics are non-finite adds no statistics (counted in ``nonfinite_batches``), and a warning is
logged. Rows are also checked as cast to ``store.dtype`` (float16 overflows above 65504).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from logix.capture.engine import BatchResult
from logix.config.choices import NonFinitePolicy
from logix.core.dtypes import row_dtype
from logix.errors import BatchError

log = logging.getLogger("logix")


def finite_examples(grads: dict[str, Tensor], n: int, dtype: torch.dtype | None = None) -> Tensor:
    """Which of ``n`` examples have finite values in every module's gradient (``(n, ...)``),
    also once cast to ``dtype`` (the store's)."""
    ok = torch.ones(n, dtype=torch.bool)
    for g in grads.values():
        g = g.reshape(n, -1) if dtype is None else g.reshape(n, -1).to(dtype)
        ok &= torch.isfinite(g).all(dim=1).to("cpu")
    return ok


def finite_stats(result: BatchResult) -> bool:
    return all(bool(torch.isfinite(t).all()) for d in result.stats.values() for t in d.values()
               if isinstance(t, Tensor))


def _named(ids: list | None, bad: Tensor) -> str:
    if ids is None:
        return "this batch (no data_id given)"
    names = [i for i, b in zip(ids, bad.tolist()) if b]
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return f"the examples {names[:10]}{more}"


def refuse(what: str, ids: list | None, bad: Tensor, fix: str = "") -> BatchError:
    return BatchError(
        f"Non-finite values (NaN / Inf) in {what} of {_named(ids, bad)}: the batch was not logged "
        f"(everything logged before it is kept). {fix or 'Look for a NaN loss or an overflow in this batch'}; "
        "or set capture.nonfinite: skip to drop such examples and record their ids in run.json."
    )


def screen(state, ctx, result: BatchResult) -> None:
    """Check a finished block's rows and statistics; raise, or drop what is not finite (``skip``)."""
    policy = state.config.capture.nonfinite
    grads = result.token_grads if result.token_grads is not None else result.grads
    n = len(ctx.ids) if ctx.ids is not None else (next(iter(grads.values())).shape[0] if grads else 0)
    ok = finite_examples(grads, n) if grads else torch.ones(n, dtype=torch.bool)
    stats_ok = finite_stats(result)
    if bool(ok.all()) and stats_ok and ctx.spec.rows and grads:
        dtype = row_dtype(state.config.store.dtype)
        fits = finite_examples(grads, n, dtype)
        if not bool(fits.all()) and policy is NonFinitePolicy.ERROR:
            raise refuse(f"the rows cast to store.dtype {state.config.store.dtype.value}", ctx.ids, ~fits,
                         "The values overflow this dtype: use store.dtype bfloat16 or float32")
        ok = fits
    if bool(ok.all()) and stats_ok:
        return
    if policy is NonFinitePolicy.ERROR:
        what = "the gradients" if not bool(ok.all()) else "the activation / gradient statistics"
        raise refuse(what, ctx.ids, ~ok if not bool(ok.all()) else torch.ones(n, dtype=torch.bool))
    if ctx.store is None:  # rows kept in memory (run.capture): dropped, nothing recorded on disk
        ctx.keep = ok if ctx.keep is None else ctx.keep & ok
        log.warning("logix: dropped %d non-finite examples (capture.nonfinite: skip)", int((~ok).sum()))
        return
    info, pass_name = state.info, ctx.spec.name.value
    if not stats_ok:
        result.stats.clear()
    dropped = [] if ctx.ids is None else [i for i, b in zip(ctx.ids, ok.tolist()) if not b]
    ctx.keep = ok if ctx.keep is None else ctx.keep & ok
    if dropped and ctx.spec.rows:
        info.skipped_nonfinite.setdefault(ctx.store, []).extend(dropped)
    info.nonfinite_batches[pass_name] = info.nonfinite_batches.get(pass_name, 0) + 1
    info.save()
    log.warning("logix: %s pass: dropped %d non-finite examples%s (capture.nonfinite: skip): %s",
                pass_name, len(dropped), "" if stats_ok else " and the batch's statistics", dropped[:10])
