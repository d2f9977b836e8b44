"""The Pontryagin view: stage-wise rollout, costates and Hamiltonian gradients against plain autograd (float64)."""

import pytest
import torch
from conftest import CASES, tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5
from test_conformance import METHODS, config, perturb

import deltactl as dc
from deltactl.theory.lq import LQProblem, riccati
from deltactl.theory.model import model_system, state_gradients, trainable_controls
from deltactl.theory.system import ControlSystem, Stage

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


# Every method on T5 v1.0 and BERT; the other T5 variants with a chain that acts on every kind of site.
PAIRS = [(c, m) for c in ("t5_v1_0", "bert") for m in METHODS] + [(c, "chain") for c in ("t5_v1_1", "t5_wide_heads")]


def controlled(case, method, seed=0, attention="eager"):
    if method == "chain":
        model = case.model(attn_implementation=attention)
        delta = dc.attach(model, dc.chain(config("lora"), config("prefix"), config("prompt"), config("adapter"),
                                          config("bitfit")))
        perturb(delta, seed=seed)
        return model.eval(), case.with_labels(case.batch())
    model = case.model(attn_implementation=attention)
    delta = dc.attach(model, config(method))
    perturb(delta, seed=seed)
    return model.eval(), case.with_labels(case.batch())


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# Under SDPA as well (reverse mode needs no forward-mode AD): a replay that reuses a cache the recorded pass filled
# crashes under eager attention but gives wrong numbers under SDPA, so the theory must be checked under both.
SDPA_PAIRS = [(c, m) for c in ("t5_v1_0", "bert") for m in ("lora", "prefix", "prompt", "ia3", "adapter")]
SDPA_PAIRS += [("t5_v1_1", "chain"), ("t5_wide_heads", "chain")]
ATTENTION_PAIRS = [(*pair, "eager") for pair in PAIRS] + [(*pair, "sdpa") for pair in SDPA_PAIRS]


@pytest.mark.parametrize(("name", "method", "attention"), ATTENTION_PAIRS)
def test_stages_reproduce_the_loss_and_the_rollout(name, method, attention):
    case = CASES[name]
    model, batch = controlled(case, method, attention=attention)
    system = model_system(model, batch)
    states, objective = system.forward(trainable_controls(model))
    with torch.no_grad():
        assert objective.item() == pytest.approx(model(**batch).loss.item(), rel=1e-13)
        rollout = dc.backbone_for(model).rollout(**batch)
    for stack, trajectory in rollout.states.items():
        for j, h in enumerate(trajectory):
            torch.testing.assert_close(states[f"{stack}.{j}"], h, atol=1e-13, rtol=0)
            torch.testing.assert_close(system.recorded[f"{stack}.{j}"], h, atol=0, rtol=0)


@pytest.mark.parametrize(("name", "method", "attention"), ATTENTION_PAIRS)
def test_costates_are_minus_the_backpropagated_gradients(name, method, attention):
    model, batch = controlled(CASES[name], method, attention=attention)
    view = model_system(model, batch).costates(trainable_controls(model))
    model.zero_grad()
    reference = state_gradients(model, batch)  # plain loss.backward() with retained state gradients
    assert set(reference) <= set(view.costates)
    for node, g in reference.items():
        assert rel(view.costates[node], -g) < 1e-11, node
    gradient = view.gradient()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    scale = max(g.abs().max() for g in grads.values())  # some entries are 0 exactly (a key bias moves no softmax)
    for name, g in grads.items():
        assert (gradient[name] - g).abs().max() / scale < 1e-12, name
    assert view.objective.item() == pytest.approx(model(**batch).loss.item(), rel=1e-13)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_decoder_costates_reach_the_encoder_through_cross_attention(attention):
    model = tiny_t5(attn_implementation=attention)
    delta = dc.attach(model, config("lora"))
    perturb(delta)
    model.eval()
    batch = {**tiny_batch(), "labels": tiny_batch()["decoder_input_ids"]}
    batch.pop("decoder_input_ids")
    view = model_system(model, batch).costates(trainable_controls(model))
    with torch.no_grad():
        e = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    e = e.clone().requires_grad_()
    loss = model(encoder_outputs=(e,), attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    (g,) = torch.autograd.grad(loss, e)
    assert g.abs().max() > 0
    assert rel(view.costates["encoder.out"], -g) < 1e-12
    # the encoder's last costate is that of e pulled back through the final norm: not zero, not equal to it
    assert view.costates["encoder.2"].abs().max() > 0


def test_per_layer_controls_only_enter_their_own_hamiltonian():
    model = tiny_t5()
    delta = dc.attach(model, config("lora", sites=("*.attn.q",)))
    perturb(delta)
    model.eval()
    batch = {**tiny_batch(), "labels": tiny_batch()["decoder_input_ids"]}
    view = model_system(model, batch).costates(trainable_controls(model))
    for stage, grads in view.hamiltonian_grads.items():
        for name, g in grads.items():
            site = name.split(".")[-2].replace("__attn__q", "").replace("__", ".")  # e.g. "decoder.1"
            assert (g.abs().max() > 0) == (site == stage), (stage, name)


def test_graph_errors_are_explained():
    with pytest.raises(ValueError, match="reads \\['x'\\] before any earlier stage writes them"):
        ControlSystem([Stage("a", ("x",), None, lambda c, x: x.sum())])
    with pytest.raises(ValueError, match="needs at least one terminal stage"):
        ControlSystem([Stage("a", (), "x", lambda c: c["u"])])
    with pytest.raises(ValueError, match="written twice"):
        ControlSystem([Stage("a", (), "x", lambda c: c["u"]), Stage("b", (), "x", lambda c: c["u"]),
                       Stage("t", ("x",), None, lambda c, x: x.sum())])
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainable_controls(tiny_t5().requires_grad_(False))
    model = tiny_t5()
    dc.attach(model, config("lora"))  # a fresh controller is in training mode
    with pytest.raises(ValueError, match="call model.eval\\(\\) after attaching"):
        model_system(model, {**tiny_batch(), "labels": tiny_batch()["decoder_input_ids"]})


def test_lq_costates_follow_the_adjoint_equation_and_riccati_is_optimal():
    problem = LQProblem.random(n=3, m=2, horizon=5, seed=1)
    A, B, Q, R, Qf = problem.A, problem.B, problem.Q, problem.R, problem.Qf
    controls = problem.controls(0.2)
    view = problem.system().costates(controls)
    x, p = view.states, view.costates
    T = problem.horizon
    torch.testing.assert_close(p[f"x{T}"], -Qf @ x[f"x{T}"], atol=1e-14, rtol=0)
    for t in range(T):  # p_t = Aᵀ p_{t+1} − Q x_t, and ∇_u H_t = Bᵀ p_{t+1} − R u_t
        torch.testing.assert_close(p[f"x{t}"], A.T @ p[f"x{t + 1}"] - Q @ x[f"x{t}"], atol=1e-14, rtol=0)
        torch.testing.assert_close(view.hamiltonian_grads[f"t{t}"][f"u{t}"],
                                   B.T @ p[f"x{t + 1}"] - R @ controls[f"u{t}"], atol=1e-14, rtol=0)
    u_star, j_star = riccati(problem)
    system = problem.system()
    assert system.forward(u_star)[1].item() == pytest.approx(j_star.item(), rel=1e-13)
    assert max(g.abs().max().item() for g in system.gradient(u_star).values()) < 1e-13
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # strictly convex: any other control costs more
        other = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in u_star.items()}
        assert system.forward(other)[1] > j_star


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_encoder_only_models_with_a_state_cost(family):
    model = tiny_t5(encoder_only=True) if family == "t5" else tiny_bert(head=False)
    batch = {k: v for k, v in tiny_batch().items() if k != "decoder_input_ids"} if family == "t5" \
        else tiny_bert_batch()
    delta = dc.attach(model, dc.chain(config("lora"), config("prompt")))
    perturb(delta)
    model.eval()

    def state_cost(m, b):  # a terminal cost on the final states instead of a task loss
        return m(**b).last_hidden_state.pow(2).mean()

    view = model_system(model, batch, state_cost).costates(trainable_controls(model))
    model.zero_grad()
    reference = state_gradients(model, batch, state_cost)
    for node, g in reference.items():
        assert rel(view.costates[node], -g) < 1e-11, node
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel(view.gradient()[name], p.grad) < 1e-11, name
