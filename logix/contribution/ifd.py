"""Instruction-following difficulty (IFD): how much an instruction helps a model produce its response.

For a record with prompt Q (the templated instruction and input) and response A::

    s(A | Q) = mean over response tokens of -log p(a_k | Q, a_<k)
    s(A)     = mean over response tokens of -log p(a_k | a_<k)       (the response alone)
    IFD      = s(A | Q) / s(A)

A high IFD means the instruction does little to make the response likely: the sample is hard
to follow and, by the IFD criterion, informative. IFD >= 1 means the instruction does not help
at all (often a mismatched instruction and response); :func:`ifd_scores` reports those as NaN
when ``drop_above_one`` is set (the default), so that :func:`logix.contribution.select` never
picks them. Both terms use the same tokenization as the in-context scorer
(:func:`logix.contribution.lm.response_nll`): prompt and response tokenized separately, so the
response tokens are exactly the same in both terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from logix.contribution.lm import BosChoice, response_nll
from logix.data import PromptTemplate

if TYPE_CHECKING:
    import torch.nn as nn
    from transformers import PreTrainedTokenizerBase


@dataclass
class IfdResult:
    """Per-record IFD and its two terms (mean response losses, nats per token).

    Attributes:
        ifd: ``s(A|Q) / s(A)`` per record; NaN where dropped (``>= 1`` with ``drop_above_one``).
        conditioned: ``s(A|Q)``: the response's mean loss after the prompt.
        unconditioned: ``s(A)``: the response's mean loss alone.
        n_tokens: Response tokens per record.
    """

    ifd: np.ndarray  # s(A|Q) / s(A); NaN where dropped
    conditioned: np.ndarray  # s(A|Q)
    unconditioned: np.ndarray  # s(A)
    n_tokens: np.ndarray  # response tokens


def ifd_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    *,
    template: PromptTemplate | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    drop_above_one: bool = True,
    bos: bool | str = BosChoice.AUTO,
    progress: bool = True,
) -> IfdResult:
    """IFD of every record under a frozen causal LM (two forward passes per record, batched).

    Args:
        model: A causal LM (eval mode is set for the call and restored after).
        tokenizer: Its tokenizer.
        records: Instruction records (instruction / input / output fields, see ``template``).
        template: Prompt format; Alpaca by default.
        batch_size: Sequences per forward pass.
        max_length: Longest sequence; longer prompts are truncated from the left (see ``response_nll``).
        drop_above_one: Report IFD >= 1 as NaN (never selected).
        bos: Prepend the BOS token to both sequences: ``"auto"`` does whenever the tokenizer has one
            (GPT-2's ``<|endoftext|>`` included), so every response token is scored in both terms.
        progress: Show a progress bar.

    Returns:
        Per record its IFD and the two terms.

    Raises:
        DataError: A record lacks a field or has an empty response.
    """
    template = template or PromptTemplate()
    prompts = [template.prompt(r) for r in records]
    responses = [template.response(r) for r in records]
    # BOS whenever the tokenizer has one, so that s(A) scores every response token (a one-token
    # response has nothing to score without a context) and both terms see the same context start.
    bos = tokenizer.bos_token_id is not None if bos == BosChoice.AUTO else bos
    kw = dict(batch_size=batch_size, max_length=max_length, progress=progress, bos=bos)
    nll_q, n_q = response_nll(model, tokenizer, prompts, responses, **kw)
    nll_a, n_a = response_nll(model, tokenizer, [""] * len(records), responses, **kw)
    conditioned = nll_q / np.maximum(n_q, 1)
    unconditioned = nll_a / np.maximum(n_a, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ifd = conditioned / unconditioned
    if drop_above_one:
        ifd = np.where(ifd >= 1.0, np.nan, ifd)
    return IfdResult(ifd, conditioned, unconditioned, n_q)
