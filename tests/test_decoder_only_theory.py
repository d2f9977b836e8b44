"""The Pontryagin view of decoder-only models (GPT-2, Llama with grouped-query attention), float64: the block replay
checks itself, the stages reproduce the loss and the rollout, costates are minus the back-propagated state gradients,
the Hamiltonian gradients are the loss gradients, the linearised MSA step is gradient descent, and a stage's
controllability matrix has the rank its controls allow. Under eager and SDPA attention, for every method."""

import pytest
import torch
from conftest import CASES
from test_conformance import METHODS, case_config, config, perturb

import deltactl as dc
from deltactl.theory.model import model_system, state_gradients, trainable_controls
from deltactl.theory.msa import linearised_step
from deltactl.theory.reachability import spectrum, stage_map

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


FAMILIES = ("gpt2", "llama")
CHAIN = ("lora", "prefix", "prompt", "adapter", "bitfit")  # every kind of site at once
PAIRS = [(f, m, "eager") for f in FAMILIES for m in [*METHODS, "chain"]]
PAIRS += [(f, m, "sdpa") for f in FAMILIES for m in ("lora", "prefix", "prompt", "ia3", "adapter", "chain")]


def controlled(family, method, attention="eager"):
    case = CASES[family]
    model = case.model(attn_implementation=attention)
    cfg = dc.chain(*(config(m) for m in CHAIN)) if method == "chain" else case_config(case, method)
    perturb(dc.attach(model, cfg))
    return model.eval(), case.with_labels(case.batch())


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize(("family", "method", "attention"), PAIRS)
def test_replay_costates_and_hamiltonian_gradients_match_autograd(family, method, attention):
    model, batch = controlled(family, method, attention)
    system = model_system(model, batch)  # raises if replaying any stage disagrees with the model's forward
    controls = trainable_controls(model)
    states, objective = system.forward(controls)
    with torch.no_grad():
        assert objective.item() == pytest.approx(model(**batch).loss.item(), rel=1e-13)
        rollout = dc.backbone_for(model).rollout(**batch)
    assert list(rollout.states) == ["decoder"]
    for j, h in enumerate(rollout["decoder"]):
        torch.testing.assert_close(states[f"decoder.{j}"], h, atol=1e-13, rtol=0)

    view = system.costates(controls)
    model.zero_grad()
    reference = state_gradients(model, batch)
    assert set(reference) == {f"decoder.{j}" for j in range(len(rollout["decoder"]))}
    for node, g in reference.items():
        assert rel(view.costates[node], -g) < 1e-11, node
    gradient = view.gradient()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    scale = max(g.abs().max() for g in grads.values())
    for name, g in grads.items():
        assert (gradient[name] - g).abs().max() / scale < 1e-12, name


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_rows_get_the_costate_of_the_initial_state(family):
    """h⁽⁰⁾ = E(δ) holds the prompt rows: the embedding stage carries their gradient (the recorded call is replayed
    through the hook that places them, not frozen with them in it)."""
    model, batch = controlled(family, "prompt")
    view = model_system(model, batch).costates(trainable_controls(model))
    (name,) = [n for n in trainable_controls(model)]
    assert view.hamiltonian_grads["decoder.embed"][name].abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_linearised_msa_step_is_gradient_descent_and_stages_are_controllable(family):
    model, batch = controlled(family, "lora")
    controls = trainable_controls(model)
    system = model_system(model, batch)
    step = linearised_step(system, controls, proximal=5.0)
    model.zero_grad()
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(step[name], controls[name] - p.grad / 5.0, atol=1e-12, rtol=0)
    # One block's controllability matrix ∂h⁽¹⁾/∂δ: only the block's own LoRA factors move it, so its rank is at most
    # their count, and it is not zero.
    own = {n: v for n, v in controls.items() if "decoder__0__" in n}
    spec = spectrum(stage_map(system, "decoder.0", controls), controls)
    assert 0 < spec.rank <= sum(v.numel() for v in own.values())
