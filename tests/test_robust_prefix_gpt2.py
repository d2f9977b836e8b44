"""Robust prefix-tuning on GPT-2, as in its reference setting: the label is read at the last real token (the paper's
[ANS] position), the canonical manifolds are fitted on the decoder stack, and the per-batch ψ lowers the manifold
cost and is put back to 0 afterwards."""

import torch
from conftest import VOCAB, tiny_gpt2

import deltactl as dc
from deltactl.inference.manifold import pool
from deltactl.inference.robust_prefix import RobustPrefix, fit_manifold, manifold_cost
from deltactl.inference.rollout import truncated_rollout

LABEL_TOKENS = torch.tensor([5, 9])  # the two label words' tokens


def last_token_classifier(model):
    """Logits over the label tokens at each row's last real token (right padding)."""

    def classify(input_ids, attention_mask):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -input_ids.shape[1]:]
        last = attention_mask.sum(1) - 1
        return logits[torch.arange(input_ids.shape[0]), last][:, LABEL_TOKENS]

    return classify


def batch(seed, rows=6, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[::2, length - 2:] = 0  # right-padded rows: their last real token is not the last column
    return {"input_ids": ids, "attention_mask": mask}


def test_last_readout_picks_each_rows_last_real_token():
    state = torch.arange(2 * 5 * 1, dtype=torch.float64).view(2, 5, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])  # right- and left-padded
    assert pool(state, mask, "last").flatten().tolist() == [2.0, 9.0]
    assert pool(state, None, "last").flatten().tolist() == [4.0, 9.0]


def test_robust_prefix_runs_on_gpt2_and_lowers_the_manifold_cost():
    model = tiny_gpt2()
    delta = dc.attach(model, "prefix", length=2, reparameterize=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    classify = last_token_classifier(model)
    train = []
    for seed in range(4):
        inputs = batch(seed)
        with torch.no_grad():
            labels = classify(**inputs).argmax(-1)  # the trained prefix's own answers: all correct
        train.append((inputs, labels))
    manifold = fit_manifold(delta, train, classify, readout="last", stack="decoder", threshold=0.9)
    assert manifold.examples == manifold.seen == 24 and len(manifold.layers) == 3  # h⁽⁰⁾…h⁽²⁾ of 2 blocks

    test = batch(10)
    with torch.no_grad():  # ψ = 0: the trained prefix alone
        cost = manifold_cost(manifold, 3, test["attention_mask"], stack="decoder")
        before = cost(truncated_rollout(delta.backbone, "decoder", 3, run=classify, **test)).item()
        plain = classify(**test)
    robust = RobustPrefix(delta, manifold, classify, n_layers=3, steps=5, lr=0.05, stack="decoder")
    result = robust(**test)
    with torch.no_grad():
        assert all(float(p.abs().max()) == 0.0 for p in robust.psi.values())  # ψ is back to 0
        torch.testing.assert_close(classify(**test), plain, atol=0, rtol=0)  # and the prefix is P_θ again
    assert result.outputs.shape == (6, 2)
    assert len(result.costs) == 5 and abs(result.costs[0] - before) <= 1e-12 * max(1.0, before)  # starts at ψ = 0
    assert result.costs[-1] < 0.99 * before  # Adam on ψ lowers the off-manifold cost
