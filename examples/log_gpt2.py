"""Log per-example LoGra gradients of a tiny GPT-2 and print what was stored.

Runs offline: the model is built from a config with seeded random weights and the
data are generated token sequences of varying length (right-padded). The loop is
an ordinary PyTorch eval loop; the two logix lines are ``run.watch(model)`` and the
``with run(...)`` block around forward + backward.

    python examples/log_gpt2.py                           # configs/logix.yaml
    python examples/log_gpt2.py --config configs/ekfac_pca.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

import logix

ROOT = Path(__file__).resolve().parent.parent


def make_model(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with random weights (use ``from_pretrained`` for a real one)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def make_data(n: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token sequences of random length, right-padded, with labels -100 on padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len // 4, seq_len + 1, (n,), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(0, vocab, (n, seq_len), generator=gen) * mask
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"id": torch.arange(n), "input_ids": input_ids, "attention_mask": mask, "labels": labels}


def summed_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss summed over each example's label tokens (a sum, not a mean)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def batches(data: dict[str, torch.Tensor], size: int):
    for lo in range(0, len(data["id"]), size):
        yield {k: v[lo : lo + size] for k, v in data.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "logix.yaml"))
    parser.add_argument("--root", default=None, help="run root (default: the config's)")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model = make_model()
    data = make_data(args.examples, seq_len=48, vocab=model.config.vocab_size)

    run = logix.init("gpt2_example", config=args.config, root=args.root, overwrite=True)
    run.watch(model)
    for pass_ in run.plan():
        for batch in tqdm(list(batches(data, args.batch_size)), desc=str(pass_)):
            with run(data_id=batch["id"], mask=batch["attention_mask"]):
                summed_lm_loss(model, batch).backward()
            model.zero_grad(set_to_none=True)
    store = run.finalize()

    print(f"\nrun directory : {run.dir}")
    print(f"passes        : {run.passes}")
    print(f"rows          : {store.n_rows} in {store.n_shards} shard(s), dtype {store.dtype_name}")
    print(f"row width     : {store.dim} values = {store.nbytes() / store.n_rows:.0f} bytes per example")
    print(f"ids           : {store.ids[:5]} ... {store.ids[-3:]}")
    print(f"{'module':<32}{'kind':<11}{'block (k_out x k_in)':>22}")
    for block in store.layout.blocks:
        print(f"{block.name:<32}{block.kind:<11}{str(block.shape):>22}")
    stats = run.statistics
    name = store.modules[0]
    print(f"statistics    : {sorted({k.split('::')[1] for k in stats.flat()})}")
    print(f"A[{name}] diag : {stats.mean(name, 'A').diagonal()[:4].tolist()}")
    first = store.get([0])[0]
    print(f"row of id 0   : norm {first.norm():.4f}, first values {first[:4].tolist()}")


if __name__ == "__main__":
    main()
