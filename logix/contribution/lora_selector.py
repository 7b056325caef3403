"""A LoRA-adapted sequence classifier on the records' text: the original recipe's selector.

Label 1 = the top ``label_top_p`` of the scored sample by score; it predicts the log-odds of the
top class for every record, one forward pass each (see :mod:`logix.contribution.selector`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from logix.contribution.embeddings import record_texts
from logix.contribution.selector_report import SelectorReport, holdout_report, top_labels
from logix.core.progress import progress_bar
from logix.data import PromptTemplate
from logix.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class LoraSelector:
    """A LoRA-adapted sequence classifier on the records' text; label 1 = top ``label_top_p`` by score.

    Built from a causal LM (its weights initialise the classifier's body) or a hub name.

    Args:
        model: A transformers causal LM, or a name for ``AutoModelForSequenceClassification.from_pretrained``.
        tokenizer: Its tokenizer (needs a pad token).
        template: Prompt format (Alpaca by default).
        label_top_p: Share of the scored sample labelled 1 (the top by score), in (0, 1).
        r: LoRA rank.
        alpha: LoRA scale.
        dropout: LoRA dropout.
        target_modules: Module names LoRA adapts (peft's defaults for the architecture when None).
        epochs: Training epochs of the adapter and the classification head.
        lr: Their learning rate.
        batch_size: Their batch size.
        max_length: Tokens of each record's text kept.
        seed: Seed of the initialisation and of the batch order.
        progress: Show a progress bar over the epochs.

    Raises:
        DataError: ``label_top_p`` is outside (0, 1), or the tokenizer has no pad token.
    """

    head = "lora"

    def __init__(self, model: nn.Module | str, tokenizer: PreTrainedTokenizerBase, *, template: PromptTemplate | None = None,
                 label_top_p: float = 0.1, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                 target_modules: Sequence[str] | None = None, epochs: int = 3, lr: float = 1e-3,
                 batch_size: int = 8, max_length: int = 256, seed: int = 0, progress: bool = False) -> None:
        if not 0 < label_top_p < 1:
            raise DataError(f"label_top_p must be in (0, 1), got {label_top_p!r}")
        if tokenizer.pad_token is None:
            raise DataError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
        self.base, self.tokenizer = model, tokenizer
        self.template = template or PromptTemplate()
        self.label_top_p, self.r, self.alpha, self.dropout = label_top_p, r, alpha, dropout
        self.target_modules = list(target_modules) if target_modules else None
        self.epochs, self.lr, self.batch_size, self.max_length = epochs, lr, batch_size, max_length
        self.seed, self.progress = seed, progress
        self.model: nn.Module | None = None

    def _classifier(self) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        if isinstance(self.base, str):
            clf = AutoModelForSequenceClassification.from_pretrained(self.base, num_labels=1)
        else:
            config = self.base.config.__class__.from_dict(self.base.config.to_dict())
            config.num_labels = 1
            config.pad_token_id = self.tokenizer.pad_token_id
            clf = AutoModelForSequenceClassification.from_config(config)
            missing = clf.load_state_dict(self.base.state_dict(), strict=False)
            body = [k for k in clf.state_dict() if k not in missing.missing_keys]
            if not body:
                raise DataError("the causal LM's weights do not fit the sequence classifier of its architecture")
        clf.config.pad_token_id = self.tokenizer.pad_token_id
        conv1d = type(clf).__name__.startswith("GPT2")  # GPT-2's Conv1D stores weights transposed
        lora = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, task_type="SEQ_CLS",
                          target_modules=self.target_modules, fan_in_fan_out=conv1d)
        return get_peft_model(clf, lora)

    def _logits(self, texts: list[str]) -> Tensor:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        device = next(self.model.parameters()).device
        return self.model(input_ids=enc["input_ids"].to(device),
                          attention_mask=enc["attention_mask"].to(device)).logits.squeeze(-1).float()

    def fit(self, records: Sequence[Mapping[str, Any]], y: np.ndarray) -> LoraSelector:
        y = np.asarray(y, np.float64).reshape(-1)
        if len(records) != y.shape[0]:
            raise DataError(f"{len(records)} records but {y.shape[0]} scores")
        keep = np.flatnonzero(~np.isnan(y))
        texts = record_texts([records[i] for i in keep], self.template)
        labels = torch.tensor(top_labels(y[keep], self.label_top_p), dtype=torch.float32)
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            self.model = self._classifier()
        finally:
            torch.random.set_rng_state(state)
        gen = torch.Generator().manual_seed(self.seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr)
        pos = float(labels.mean())
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - pos) / max(pos, 1e-6)))
        self.model.train()
        for _ in progress_bar(range(self.epochs), desc="logix lora selector", unit="epoch", enabled=self.progress):
            for batch in torch.randperm(len(texts), generator=gen).split(self.batch_size):
                opt.zero_grad()
                logits = self._logits([texts[i] for i in batch])
                loss_fn(logits, labels[batch].to(logits.device)).backward()
                opt.step()
        self.model.eval()
        return self

    @torch.no_grad()
    def predict(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Log-odds of the top class for every record (one forward pass each, batched)."""
        if self.model is None:
            raise DataError("fit the selector before predict()")
        texts = record_texts(records, self.template)
        out = [self._logits(texts[i:i + self.batch_size]).cpu() for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out).double().numpy()

    def evaluate(self, records: Sequence[Mapping[str, Any]], y: np.ndarray, *, holdout: float = 0.2,
                 seed: int | None = None) -> SelectorReport:
        return holdout_report(self, list(records), y, holdout, self.seed if seed is None else seed, self.label_top_p)
