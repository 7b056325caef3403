"""The model a config names: ``from_pretrained(model.name)`` or a seeded architecture, with LoRA."""

from __future__ import annotations

import torch
from torch import nn

from logix.config import Config, ModelArch
from logix.core.dtypes import torch_dtype
from logix.errors import ConfigError


def build_model(config: Config, tokenizer) -> nn.Module:
    """``from_pretrained(model.name)``, or ``model.arch`` built from ``arch_config`` with seeded weights;
    wrapped with LoRA adapters when ``model.lora.enabled``.

    Args:
        config: The job's config (its ``model`` section).
        tokenizer (PreTrainedTokenizerBase): The tokenizer: a seeded model's vocabulary and special
            tokens come from it; a hub model's vocabulary must hold it.

    Returns:
        The causal LM, in ``model.dtype``.

    Raises:
        ConfigError: The tokenizer has more tokens than the hub model's vocabulary, or
            ``model.arch_config`` is not valid for ``model.arch``.
    """
    mc = config.model
    dtype = torch_dtype(mc.dtype)
    if mc.name:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(mc.name, dtype=dtype)
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ConfigError(
                f"The tokenizer has {len(tokenizer)} tokens but {mc.name}'s vocabulary has {vocab}: set "
                f"model.tokenizer to the model's own tokenizer (e.g. model.tokenizer={mc.name})."
            )
    else:
        model = _seeded_model(config, tokenizer).to(dtype)
    if mc.lora.enabled:
        model = with_lora(model, config)
    return model


def _seeded_model(config: Config, tokenizer) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    mc = config.model
    special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    kwargs = {**special, **dict(mc.arch_config)}
    torch.manual_seed(mc.seed)
    try:
        if mc.arch is ModelArch.GPT2:
            return GPT2LMHeadModel(GPT2Config(**kwargs))
        return LlamaForCausalLM(LlamaConfig(**kwargs))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.arch_config is not valid for {mc.arch.value}: {exc}") from None


def with_lora(model: nn.Module, config: Config) -> nn.Module:
    """``model`` wrapped with the LoRA adapters ``model.lora`` describes (PEFT).

    Args:
        model: The causal LM.
        config: The job's config (``model.lora``: rank, alpha, dropout, target modules).

    Returns:
        The PEFT model (only the adapters are trainable).
    """
    from peft import LoraConfig, get_peft_model

    lc = config.model.lora
    targets = list(lc.target_modules) or None
    is_conv1d = type(model).__name__.startswith("GPT2")
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                          task_type="CAUSAL_LM", fan_in_fan_out=is_conv1d)
    return get_peft_model(model, peft_cfg)
