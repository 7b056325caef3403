"""statistics.fisher: expected — every class enumerated, weighted by sqrt(C p_c): the statistics
equal the explicit sum over classes ``sum_c p_c g_c g_c^T`` (the Gauss-Newton matrix)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import logix
from logix.core.statistics import JOINT
from logix.errors import BatchError, ConfigError
from logix.integrations import summed_loss
from logix.integrations.losses import expected_class_loss
from tests.helpers import per_example_grads, projected, rel_err

N, D_IN, HIDDEN, C = 10, 4, 5, 3
NAMES = ["0", "2"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, D_IN, generator=gen, dtype=torch.float64), torch.randint(0, C, (N,), generator=gen)


def _ce(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="sum")


def _run(tmp_path, model, x, y, projection="none", name="e", **stats):
    cfg = {"projection": {"type": projection, "rank_in": 3, "rank_out": 2, "seed": 3},
           "capture": {"compute_dtype": "float64"},
           "statistics": {"fisher": "expected", "fisher_classes": C, "ekfac": False, **stats},
           "store": {"dtype": "float32"}}  # the rows are compared to autograd gradients
    run = logix.init(name, config=cfg, root=tmp_path)
    run.watch(model)
    seen = []
    for pass_ in run.plan():
        seen.append((pass_.name, pass_.sample_labels, pass_.expected, pass_.repeats))
        for r in range(pass_.repeats):
            for lo in range(0, N, 4):
                ids = list(range(lo, min(lo + 4, N)))
                with run(data_id=ids):
                    if pass_.expected:
                        loss = expected_class_loss(model(x[ids]), y[ids], **pass_.loss_kwargs(r))
                    else:
                        loss = _ce(model, x[ids], y[ids])
                    loss.backward()
                model.zero_grad(set_to_none=True)
    run.finalize()
    return run, seen


def _class_grads(model, x):
    """Per-example gradients of every module for every class ``(C, N, d_out, d_in+1)`` and ``p``."""
    with torch.no_grad():
        p = model(x).softmax(1)
    grads = {name: [] for name in NAMES}
    for c in range(C):
        g = per_example_grads(model, NAMES, N, lambda i, c=c: _ce(model, x[i : i + 1], torch.tensor([c])))
        for name in NAMES:
            grads[name].append(g[name])
    return {name: torch.stack(v) for name, v in grads.items()}, p


def _output_grads(model, x, c):
    """``dL/d(output of module 0)`` and ``dL/d logits`` for class ``c`` of every example."""
    h = model[0](x)
    h.retain_grad()
    logits = model[2](model[1](h))
    logits.retain_grad()
    nn.functional.cross_entropy(logits, torch.full((N,), c), reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return {"0": h.grad, "2": logits.grad}


@pytest.mark.parametrize("projection", ["none", "random"])
def test_expected_statistics_equal_the_explicit_sum_over_classes(tmp_path, projection):
    model = _model()
    x, y = _data()
    run, seen = _run(tmp_path, model, x, y, projection, kfac=True, ekfac=True, raw=True, raw_joint=True)
    assert seen == [("kfac", True, True, C), ("fisher", True, True, C), ("log", False, False, 1)]
    stats = run.statistics
    grads, p = _class_grads(model, x)
    w = p.T[:, :, None]  # (C, N, 1)
    joint = []
    for name in NAMES:
        g = projected(run, name, grads[name].flatten(0, 1)).reshape(C, N, -1)  # (C, N, k)
        joint.append(g)
        oracle = torch.einsum("cni,cnj->ij", w * g, g) / N  # sum_c p_c g g^T, averaged over examples
        assert rel_err(stats.mean(name, "raw"), oracle) < 1e-10
        q_a, q_s = stats.raw_sum(name, "A_evecs"), stats.raw_sum(name, "S_evecs")
        shape = run.layout.block(name).shape
        rot = q_s.T @ g.reshape(C, N, *shape) @ q_a
        assert rel_err(stats.mean(name, "ekfac"), (w[..., None] * rot**2).sum(0).mean(0)) < 1e-10
    flat = torch.cat(joint, 2)
    assert rel_err(stats.mean(JOINT, "raw"), torch.einsum("cni,cnj->ij", w * flat, flat) / N) < 1e-10
    # S: the output-gradient covariance, expected over the classes; A is label-free
    outs = [_output_grads(model, x, c) for c in range(C)]
    for name in NAMES:
        p_out = run.projections[name].p_out
        s_full = sum((p[:, c, None] * outs[c][name]).T @ outs[c][name] for c in range(C)) / N
        s_exp = s_full if p_out is None else p_out.double().T @ s_full @ p_out.double()
        assert rel_err(stats.mean(name, "S"), s_exp) < 1e-10
    # the rows keep the real labels
    real = per_example_grads(model, NAMES, N, lambda i: _ce(model, x[i : i + 1], y[i : i + 1]))
    store = run.store()
    for name in NAMES:
        rows = store.get(list(range(N)), modules=[name]).double().reshape(N, *store.layout.block(name).shape)
        assert rel_err(rows, projected(run, name, real[name])) < 1e-6  # rows are stored as float32


def test_expected_joint_covariance_is_the_gauss_newton_matrix(tmp_path):
    """Unprojected, the whole-row covariance equals ``mean_n J_n^T (diag p_n - p_n p_n^T) J_n``
    over every logged parameter (Jacobians by autograd), in logix's row layout."""
    model = _model()
    x, y = _data()
    run, _ = _run(tmp_path, model, x, y, kfac=False, raw_joint=True)
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda prm, xi: functional_call(model, prm, (xi[None],))[0]), in_dims=(None, 0))(params, x)
    blocks = []  # canonical layout per module: (d_out, d_in + bias), bias as the last column
    for name in NAMES:
        jw, jb = jac[f"{name}.weight"], jac[f"{name}.bias"]  # (N, C, d_out, d_in), (N, C, d_out)
        blocks.append(torch.cat([jw, jb[..., None]], -1).flatten(2))
    j = torch.cat(blocks, 2)  # (N, C, P)
    with torch.no_grad():
        p = model(x).softmax(1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", j, h, j) / N
    assert rel_err(run.statistics.mean(JOINT, "raw"), ggn) < 1e-10


def test_pass_loss_kwargs():
    from logix.capture.passes import Pass

    gen = torch.Generator()
    assert Pass("log", 0, 1, True).loss_kwargs(0, gen) == {}
    assert Pass("fisher", 0, 2, False, True, 8).loss_kwargs(3, gen) == {"sample_labels": True, "generator": gen}
    assert Pass("fisher", 0, 2, False, True, 4, True).loss_kwargs(3, gen) == {"label_class": 3, "num_classes": 4}


def test_summed_loss_expected_class_weights_and_errors():
    model = _model()
    x, y = _data()
    wrapped = SimpleNamespace()

    def hf(**inputs):  # an HF-style classifier: returns .logits
        wrapped.logits = model(inputs["input_ids"])
        return wrapped

    batch = {"input_ids": x, "labels": y}
    with torch.no_grad():
        p = model(x).softmax(1)
        ce = -model(x).log_softmax(1)
    for c in range(C):
        loss = summed_loss(hf, batch, label_class=c, num_classes=C)
        assert rel_err(loss.detach(), ((C * p[:, c]).sqrt() * ce[:, c]).sum()) < 1e-6  # logits.float()
    # the weight is detached: the gradient is sqrt(C p_c) times the class-c gradient
    loss = summed_loss(hf, {"input_ids": x[:1], "labels": y[:1]}, label_class=1)
    (g,) = torch.autograd.grad(loss, model[2].bias)
    with torch.no_grad():
        expected = (C * p[0, 1]).sqrt() * (p[0] - nn.functional.one_hot(torch.tensor(1), C))
    assert rel_err(g, expected) < 1e-6
    with pytest.raises(BatchError, match="fisher_classes: 3"):
        summed_loss(hf, batch, label_class=0, num_classes=4)
    with pytest.raises(BatchError, match="fisher: true"):  # sequence labels: not exact
        expected_class_loss(torch.zeros(2, 5, C), torch.zeros(2, 5, dtype=torch.long), 0, C)


def test_expected_fisher_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="fisher_classes"):
        logix.init("a", config={"statistics": {"fisher": "expected"}}, root=tmp_path)
    with pytest.raises(ConfigError, match=r"50257 classes.*fisher: true"):
        logix.init("b", config={"statistics": {"fisher": "expected", "fisher_classes": 50257}}, root=tmp_path)
    run = logix.init("c", config={"statistics": {"fisher": "expected", "fisher_classes": 4, "raw": True, "kfac": False,
                                                  "ekfac": False}},
                     root=tmp_path)
    assert run.passes == ["fisher", "log"]


class _Classifier(nn.Module):
    """An HF-style sequence classifier: mean-pooled embeddings -> Linear, output ``.logits``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(9, 4)
        self.head = nn.Linear(4, C)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(torch.tanh(self.emb(input_ids).mean(1))))


def test_extract_runs_the_expected_fisher_passes(tmp_path):
    """``extract`` with fisher: expected calls summed_loss once per class (Pass.loss_kwargs); the
    head's raw covariance equals the explicit sum over classes, the rows keep the real labels."""
    from logix.integrations import extract

    model = _Classifier().double()
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 9, (N, 5), generator=gen)
    labels = torch.randint(0, C, (N,), generator=gen)
    items = [{"id": i, "input_ids": tokens[i], "labels": labels[i]} for i in range(N)]

    def collate(batch):
        return {"input_ids": torch.stack([b["input_ids"] for b in batch]),
                "labels": torch.stack([b["labels"] for b in batch])}

    cfg = {"projection": {"type": "none"}, "capture": {"modules": ["head"], "compute_dtype": "float64"},
           "statistics": {"kfac": False, "ekfac": False, "raw": True, "fisher": "expected", "fisher_classes": C},
           "store": {"dtype": "float32"}}
    run = logix.init("x", config=cfg, root=tmp_path)
    store = extract(run, model, items, collate, batch_size=4, progress=False)
    assert run.passes == ["fisher", "log"]

    def ce(i, c):
        return nn.functional.cross_entropy(model(tokens[i : i + 1]).logits, torch.tensor([c]), reduction="sum")

    with torch.no_grad():
        p = model(tokens).logits.softmax(1)
    oracle = 0
    for c in range(C):
        g = per_example_grads(model, ["head"], N, lambda i, c=c: ce(i, c))["head"].flatten(1)
        oracle = oracle + (p[:, c, None] * g).T @ g / N
    assert rel_err(run.statistics.mean("head", "raw"), oracle) < 1e-5  # summed_loss runs in float32
    assert run.statistics.count("head", "examples") == C * N
    real = per_example_grads(model, ["head"], N, lambda i: ce(i, int(labels[i])))["head"].flatten(1)
    assert rel_err(store.get(list(range(N))).double(), real) < 1e-5
