"""Response log-likelihoods under a frozen causal language model.

The building block of the contribution scores (IFD, in-context contribution): the summed negative
log-likelihood of a *response* given a *prefix*, counted over the response tokens only.

API::

    nll, n = response_nll(model, tokenizer, prefixes, responses, batch_size=8)
    ppl = np.exp(nll / n)          # PPL(response | prefix), one per pair

    nll, n = response_nll_ids(model, prefix_ids, response_ids, batch_size=8)   # pre-tokenized

Tokenization (exact response boundary): the prefix and the response are tokenized **separately**,
without special tokens, and their ids concatenated, ``[bos] + ids(prefix) + ids(response)``; the
loss covers exactly ``ids(response)`` (the first response token is predicted from the last prefix
token, or from BOS). So a response string is always the same token sequence, whatever precedes it.
Pass the response with its leading space when the tokenizer needs one (the Alpaca
:class:`logix.data.PromptTemplate` response is ``" " + output``). An empty prefix scores the
response alone: with BOS if the tokenizer uses one, and without BOS the first response token has
no context, so it is not scored (the count is ``len(ids(response)) - 1``).

BOS: ``bos="auto"`` prepends ``tokenizer.bos_token_id`` exactly when the tokenizer adds it itself
(``tokenizer("x")`` starts with it, as LLaMA-style tokenizers do; GPT-2 style ones do not);
``True`` / ``False`` force it.

Truncation: with ``max_length`` (default: the model's ``max_position_embeddings`` /
``n_positions`` when its config has one), a pair longer than that keeps BOS and the whole response
and loses prefix tokens from the **left** (the tokens farthest from the response). A response that
cannot fit by itself (``len(bos + response) > max_length``) is a :class:`DataError`, as is an empty
response, or a response of one token with neither prefix nor BOS (nothing to score).

Numbers: log-softmax in float32 (or the model's wider dtype), sums in float64. Pairs are sorted by
length and right-padded into batches of ``batch_size``; results come back in input order and match
one-pair-at-a-time evaluation to float tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from logix.config.choices import ChoiceEnum
from logix.core.progress import progress_bar
from logix.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase



class BosChoice(ChoiceEnum):
    """The one non-boolean choice of ``bos=``."""

    AUTO = "auto"  # prepend BOS exactly when the tokenizer adds it itself


Bos = bool | Literal["auto"] | BosChoice

__all__ = [
    "Bos",
    "BosChoice",
    "bos_ids",
    "encode",
    "keep_logits_kwargs",
    "model_max_length",
    "response_nll",
    "response_nll_ids",
    "token_nll",
]


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (empty text -> empty list)."""
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"text {i} is a {type(text).__name__}, not a str")
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def bos_ids(tokenizer: PreTrainedTokenizerBase, bos: Bos = BosChoice.AUTO) -> list[int]:
    """``[bos_token_id]`` when a BOS token is to be prepended, else ``[]``.

    Raises:
        DataError: ``bos=True`` but the tokenizer has no BOS token, or ``bos`` is not a valid choice.
    """
    if bos not in (BosChoice.AUTO, True, False):
        raise DataError(f"bos must be 'auto', True or False, got {bos!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos is False:
        return []
    if bos is True:
        if bos_id is None:
            raise DataError("bos=True but the tokenizer has no bos token; pass bos='auto' or False")
        return [int(bos_id)]
    if bos_id is None:
        return []
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [int(bos_id)] if len(ids) > 0 and ids[0] == bos_id else []


def model_max_length(model: Any) -> int | None:
    """The longest sequence the model's position embeddings allow, if its config says so."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")


def fit_pair(
    bos: list[int], prefix: list[int], response: list[int], max_length: int | None, index: int = 0
) -> list[int]:
    """Apply the truncation policy: return the (possibly left-truncated) prefix ids.

    Raises:
        DataError: The response is empty, too long to fit, or has nothing to be predicted from.
    """
    if not response:
        raise DataError(f"pair {index}: the response has no tokens; drop empty responses before scoring")
    if not bos and not prefix and len(response) < 2:
        raise DataError(f"pair {index}: a one-token response with neither prefix nor bos has no token to score; "
                        "use a tokenizer with a bos token or bos=True")
    if max_length is None:
        return prefix
    room = max_length - len(bos) - len(response)
    if room < 0:
        raise DataError(f"pair {index}: the response alone has {len(response)} tokens (+{len(bos)} bos), more than "
                        f"max_length={max_length}; raise max_length or drop the record")
    return prefix[len(prefix) - room:] if len(prefix) > room else prefix


def keep_logits_kwargs(model: torch.nn.Module, keep: int) -> dict[str, int]:
    """``{"logits_to_keep": keep}`` when the model's forward takes it (recent Hugging Face causal LMs), else ``{}``.

    The model then returns logits for the last ``keep`` positions only; callers find the offset
    from the returned width.
    """
    import inspect

    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": int(keep)} if "logits_to_keep" in params else {}


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log softmax(logits)[target]`` per row, in float32 at least (rows: ``(M, V)``, targets ``(M,)``)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.inference_mode()
def response_nll_ids(
    model: torch.nn.Module,
    prefix_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    bos: Sequence[int] = (),
    batch_size: int = 8,
    max_length: int | None = None,
    pad_token_id: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response NLL and response token count of each pre-tokenized pair.

    Each sequence is ``bos + prefix + response``; the prefix is truncated from the left to fit
    ``max_length`` (see the module docstring). ``max_length=None`` here means no limit.

    Returns:
        ``(nll, count)``: float64 and int64 arrays of length ``len(prefix_ids)``.
    """
    _check_batch_size(batch_size)
    if len(prefix_ids) != len(response_ids):
        raise DataError(f"{len(prefix_ids)} prefixes but {len(response_ids)} responses; pass one prefix per response")
    bos = [int(b) for b in bos]
    seqs: list[list[int]] = []
    starts: list[int] = []
    for i, (p, r) in enumerate(zip(prefix_ids, response_ids)):
        p = fit_pair(bos, list(p), list(r), max_length, i)
        head = bos + p
        seqs.append(head + list(r))
        starts.append(max(len(head), 1))  # first scored position (a token with something before it)
    n = len(seqs)
    nll = np.zeros(n, dtype=np.float64)
    count = np.array([len(s) - st for s, st in zip(seqs, starts)], dtype=np.int64)
    was_training = model.training
    model.eval()
    device = _device(model)
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    try:
        for lo in progress_bar(range(0, n, batch_size), enabled=progress, desc="response nll", unit="batch"):
            chunk = order[lo:lo + batch_size]
            width = max(len(seqs[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, :len(seqs[i])] = 1
            # logits only from the first position that predicts a response token on (saves the LM head
            # on prefix tokens, where the model supports logits_to_keep)
            first = min(starts[i] for i in chunk) - 1
            extra = keep_logits_kwargs(model, width - first)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **extra).logits
            offset = width - logits.shape[1]
            rows, cols = [], []
            for row, i in enumerate(chunk):
                positions = range(starts[i], len(seqs[i]))
                rows.extend([row] * len(positions))
                cols.extend(positions)
            r = torch.tensor(rows, device=device)
            c = torch.tensor(cols, device=device)
            per_token = token_nll(logits[r, c - 1 - offset], ids.to(device)[r, c]).double().cpu()
            sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, r.cpu(), per_token)
            nll[chunk] = sums.numpy()
    finally:
        model.train(was_training)
    return nll, count


def response_nll(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prefixes: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    bos: Bos = BosChoice.AUTO,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of each response given its prefix, over the response tokens only.

    Args:
        model: A causal LM returning ``.logits`` (a Hugging Face ``*ForCausalLM``); used frozen,
            in eval mode (its training flag is restored afterwards), under ``torch.inference_mode``.
        tokenizer: The model's tokenizer.
        prefixes: The conditioning text of each pair; ``""`` scores the response alone.
        responses: The scored text of each pair (non-empty after tokenization).
        batch_size: Pairs per forward pass.
        max_length: The longest sequence; longer pairs lose prefix tokens from the left. ``None``
            takes the model's position limit from its config (no limit if it has none).
        bos: ``"auto"``, ``True`` or ``False`` (see the module docstring).
        progress: Show a progress bar (stderr).

    Returns:
        ``(nll, count)``: per pair, the summed NLL (float64, nats) and the number of response
        tokens scored (int64). ``exp(nll / count)`` is the response perplexity.

    Raises:
        DataError: The lists differ in length, a text is not a string, a response is empty or does
            not fit ``max_length``, or an option is invalid.
    """
    if len(prefixes) != len(responses):
        raise DataError(f"{len(prefixes)} prefixes but {len(responses)} responses; pass one prefix per response")
    if max_length is None:
        max_length = model_max_length(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return response_nll_ids(
        model,
        encode(tokenizer, prefixes),
        encode(tokenizer, responses),
        bos=bos_ids(tokenizer, bos),
        batch_size=batch_size,
        max_length=max_length,
        pad_token_id=int(pad),
        progress=progress,
    )
