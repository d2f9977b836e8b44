"""deltactl against PEFT on decoder-only models with identical weights: the tiny GPT-2 and Llama (grouped-query
attention: 4 query heads, 2 key/value heads) of conftest, float64, to 1e-9.

Checked for each family: logits, loss (labels = the tokens) and the gradients of the loss w.r.t. every δ, on a batch
with a right-padded row, and greedy ``generate()`` with a key/value cache (tokens and per-step scores):

- LoRA. GPT-2's ``c_attn`` fuses q, k and v (a Conv1D, weight stored (in, out)); PEFT targets it whole, which is
  deltactl's site ``decoder.j.attn.qkv``. deltactl's default q and v sites are output slices of it, each with its
  own A and B (the LoRA paper's GPT-2 setting); PEFT's rank-2r update of c_attn with A = [A_q; A_v] and
  B = [[B_q, 0], [0, 0], [0, B_v]] is the same map, which checks the slices. Llama: q_proj, v_proj.
- IA3 on k, v and the FFN input of ``ffn.wo``. On GPT-2 PEFT scales all of c_attn's 3d outputs: its vector is
  [1; l_k; l_v].
- Prompt tuning: the rows are placed before the token embeddings with positions 0…p−1 as in PEFT, so the logits
  (p+T long) and the loss (labels widened with −100) agree as they are.
- Prefix tuning: PEFT passes the rows as a key/value cache, which moves the tokens to positions p…p+T−1; deltactl's
  rows change attention only, so deltactl gets ``position_ids`` p…p+T−1 here. Its rows are PEFT's embedding slots 2l
  and 2l+1 for layer l, per key/value head on Llama. For ``generate()`` (which counts positions itself) deltactl's
  GPT-2 gets the position table shifted by p, and deltactl's Llama keys are rotated by −p (rotary positions), each
  the exact counterpart of the shift.

``generate()`` is compared with greedy decoding by PEFT's forward passes: PEFT 0.21.2 on transformers 5.24 decodes
prompt learning wrongly in its own ``generate()`` (``_against_peft_generate``), which shows as an expected failure
at the end of those tests.

And deltactl's own incremental decoding: ``generate()`` with a cache equals ``generate()`` without one, for prompts
(placed once, then in the cache) and prefixes (read at every step).
"""

import copy

import pytest
import torch
from conftest import causal_labels, tiny_causal_batch, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from test_conformance import perturb

import deltactl as dc
from deltactl.control.controller import site_key

TOL = 1e-9
P = 3  # prompt rows / prefix rows
# Mistral and Qwen2 have Llama's layer (module names included): they run through the Llama backbone's sites.
FAMILIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2}
LLAMA_LIKE = ("llama", "mistral", "qwen2")
LORA = {"gpt2": ("*.attn.qkv",), **{f: ("*.q", "*.v") for f in LLAMA_LIKE}}
IA3 = {"gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
       **{f: (["k_proj", "v_proj", "down_proj"], ["down_proj"]) for f in LLAMA_LIKE}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def _pair(family):
    model = FAMILIES[family]()
    return model, copy.deepcopy(model)


def _batch():
    batch = tiny_causal_batch()
    return {**batch, "labels": causal_labels(batch)}


def _peft(model, config):
    return get_peft_model(model, config).double().eval()


def _peft_module(peft_model, path):
    return peft_model.base_model.model.get_submodule(path)


def _compare(ours, theirs, batch, ours_extra=None):
    """Logits and loss of both models on ``batch``; returns the max differences after backward on both."""
    a = ours(**batch, **(ours_extra or {}))
    b = theirs(**batch)
    assert a.logits.shape == b.logits.shape
    logits, loss = (a.logits - b.logits).abs().max().item(), (a.loss - b.loss).abs().item()
    a.loss.backward()
    b.loss.backward()
    assert logits < TOL and loss < TOL, (logits, loss)
    return logits, loss


def _close(x, y):
    torch.testing.assert_close(x, y, atol=TOL, rtol=0)


def _greedy(model, new_tokens=4, **options):
    batch = tiny_causal_batch()
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                             max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0, **options)
    return out.sequences, torch.stack(out.scores)


SCORE_TOL = 1e-6  # generate() hands its scores back in float32


def _same_scores(a, b) -> bool:
    return torch.allclose(a.double(), b.double(), atol=SCORE_TOL, rtol=0)


def _same_generation(ours, theirs):
    (tokens_a, scores_a), (tokens_b, scores_b) = ours, theirs
    assert torch.equal(tokens_a, tokens_b)
    torch.testing.assert_close(scores_a.double(), scores_b.double(), atol=SCORE_TOL, rtol=0)


def _greedy_by_forward(model, new_tokens=4):
    """Greedy decoding by full forward passes (no cache, no generate()): tokens (EOS, then padding) and scores."""
    tokens = tiny_causal_batch()["input_ids"]
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    scores = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[:, -1]
            scores.append(logits)
            nxt = torch.where(done, 0, logits.argmax(-1))
            done |= nxt == 1
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return tokens, torch.stack(scores)


def _against_peft_generate(ours, theirs):
    """deltactl's cached greedy decode against greedy decoding by PEFT's forward passes, then PEFT's own generate().

    PEFT 0.21.2 on transformers 5.24 decodes prompt learning wrongly with a cache: its generation hook looks for the
    cache under the name ``past_key_values``, which 5.24 renamed ``cache``, so it places the prompt (or prefix) again
    at every step; on Llama its prefix decode is off after the first step even without a cache. Where PEFT's
    ``generate()`` differs from its own forward passes the last comparison is an expected failure, and a PEFT that
    fixes it makes this test compare the decodes directly.
    """
    reference = _greedy_by_forward(theirs)
    cached = _greedy(ours, use_cache=True)
    _same_generation(cached, reference)
    peft_decodes = [_greedy(theirs, use_cache=flag) for flag in (True, False)]
    if not all(torch.equal(t, reference[0]) and _same_scores(sc, reference[1]) for t, sc in peft_decodes):
        pytest.xfail("PEFT's generate() of prompt learning differs from greedy decoding by its own forward passes "
                     "(transformers 5.24 renamed the cache argument PEFT looks for)")
    for decode in peft_decodes:
        _same_generation(cached, decode)


# ---- LoRA -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_matches_peft(family):
    ours, base = _pair(family)
    delta = dc.attach(ours, "lora", r=2, alpha=4.0, sites=LORA[family])
    perturb(delta)
    modules = sorted({s.module.rsplit(".", 1)[1] for s in delta.controller.sites})
    theirs = _peft(base, LoraConfig(r=2, lora_alpha=4, target_modules=modules, fan_in_fan_out=family == "gpt2"))
    pairs = []
    with torch.no_grad():
        for site in delta.controller.sites:
            layer, peft_layer = delta.controller.layers[site_key(site.name)], _peft_module(theirs, site.module)
            peft_layer.lora_A["default"].weight.copy_(layer.A)
            peft_layer.lora_B["default"].weight.copy_(layer.B)
            pairs.append((layer, peft_layer))
    _compare(ours, theirs, _batch())
    for layer, peft_layer in pairs:
        _close(layer.A.grad, peft_layer.lora_A["default"].weight.grad)
        _close(layer.B.grad, peft_layer.lora_B["default"].weight.grad)
    _same_generation(_greedy(ours), _greedy(theirs))


def test_gpt2_lora_on_q_and_v_slices_is_peft_c_attn_with_block_factors():
    ours, base = _pair("gpt2")
    delta = dc.attach(ours, "lora", r=2, alpha=4.0)  # the defaults: q and v, slices of c_attn
    assert sorted(s.name for s in delta.controller.sites) == [f"decoder.{j}.attn.{p}" for j in (0, 1) for p in "qv"]
    perturb(delta)
    theirs = _peft(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    d = ours.config.n_embd
    with torch.no_grad():
        for j in (0, 1):
            q, v = (delta.controller.layers[site_key(f"decoder.{j}.attn.{p}")] for p in "qv")
            layer = _peft_module(theirs, f"transformer.h.{j}.attn.c_attn")
            layer.lora_A["default"].weight.copy_(torch.cat([q.A, v.A]))
            B = torch.zeros(3 * d, 4, dtype=torch.float64)
            B[:d, :2], B[2 * d :, 2:] = q.B, v.B
            layer.lora_B["default"].weight.copy_(B)
    _compare(ours, theirs, _batch())
    for j in (0, 1):
        q, v = (delta.controller.layers[site_key(f"decoder.{j}.attn.{p}")] for p in "qv")
        layer = _peft_module(theirs, f"transformer.h.{j}.attn.c_attn")
        gA, gB = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        _close(q.A.grad, gA[:2])
        _close(v.A.grad, gA[2:])
        _close(q.B.grad, gB[:d, :2])
        _close(v.B.grad, gB[2 * d :, 2:])


# ---- IA3 ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_matches_peft(family):
    ours, base = _pair(family)
    delta = dc.attach(ours, "ia3")  # k, v, and the input of ffn.wo
    perturb(delta, scale=0.5)
    targets, feedforward = IA3[family]
    theirs = _peft(base, IA3Config(target_modules=targets, feedforward_modules=feedforward))
    d = ours.config.hidden_size
    with torch.no_grad():
        for site in delta.controller.sites:
            scale = delta.controller.layers[site_key(site.name)].l
            peft_l = _peft_module(theirs, site.module).ia3_l["default"]
            if "slice" in site.dims:  # GPT-2: k and v are slices of c_attn, whose q part stays 1
                lo, hi = site.dims["slice"]
                peft_l.view(-1)[lo:hi] = scale
            else:
                peft_l.view(-1).copy_(scale)
    _compare(ours, theirs, _batch())
    for site in delta.controller.sites:
        grad = _peft_module(theirs, site.module).ia3_l["default"].grad.view(-1)
        lo, hi = site.dims.get("slice", (0, grad.numel()))
        _close(delta.controller.layers[site_key(site.name)].l.grad, grad[lo:hi])
    if family == "gpt2":  # q is not scaled: its slice of PEFT's vector gets a gradient but stays 1
        assert torch.equal(_peft_module(theirs, "transformer.h.0.attn.c_attn").ia3_l["default"].view(-1)[:d],
                           torch.ones(d, dtype=torch.float64))
    _same_generation(_greedy(ours), _greedy(theirs))


# ---- prompt tuning --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_matches_peft_and_decodes_the_same_with_a_cache(family):
    ours, base = _pair(family)
    delta = dc.attach(ours, "prompt", length=P)
    perturb(delta)
    theirs = _peft(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    rows = delta.controller.layers[site_key("decoder.embed")].rows
    embedding = theirs.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(rows)
    _compare(ours, theirs, _batch())
    _close(rows.grad, embedding.grad)
    _same_generation(_greedy(ours, use_cache=True), _greedy(ours, use_cache=False))
    _against_peft_generate(ours, theirs)


def test_prompt_rows_equal_the_tokens_they_copy():
    """Rows equal to the embeddings of tokens t₁…tₚ are exactly the model run on [t₁…tₚ; x] (positions included)."""
    for make in FAMILIES.values():
        model = make()
        batch = tiny_causal_batch()
        lead = torch.tensor([5, 9, 11])
        delta = dc.attach(model, "prompt", length=P)
        with torch.no_grad():
            delta.controller.layers[site_key("decoder.embed")].rows.copy_(model.get_input_embeddings().weight[lead])
            ours = model(**batch).logits
            delta.detach()
            ids = torch.cat([lead.expand(2, P), batch["input_ids"]], dim=1)
            mask = torch.cat([torch.ones(2, P, dtype=torch.long), batch["attention_mask"]], dim=1)
            _close(ours, model(input_ids=ids, attention_mask=mask).logits)


# ---- prefix tuning --------------------------------------------------------------------------------------------------


def _peft_prefix(delta, theirs):
    """PEFT's prefix embedding from deltactl's rows: layer l's keys and values are slots 2l, 2l+1."""
    rows = [delta.controller.rows[site_key(f"decoder.{j}.attn.kv")] for j in range(len(delta.controller.sites))]
    embedding = theirs.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(torch.cat(rows, dim=1))
    return rows, embedding


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_matches_peft_per_key_value_head(family):
    ours, base = _pair(family)
    delta = dc.attach(ours, "prefix", length=P, reparameterize=False)
    perturb(delta)
    heads = ours.config.num_key_value_heads if family in LLAMA_LIKE else ours.config.n_head
    assert all(s.dims["heads"] == heads for s in delta.controller.sites)  # Llama: 2 key/value heads, not 4
    theirs = _peft(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    rows, embedding = _peft_prefix(delta, theirs)
    batch = _batch()
    shifted = (torch.arange(batch["input_ids"].shape[1]) + P).expand(2, -1)  # where PEFT's cache puts the tokens
    _compare(ours, theirs, batch, ours_extra={"position_ids": shifted})
    width = rows[0].shape[1]
    for j, r in enumerate(rows):
        _close(r.grad, embedding.grad[:, j * width : (j + 1) * width])


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_generate_matches_peft_and_decodes_the_same_with_a_cache(family):
    ours, base = _pair(family)
    delta = dc.attach(ours, "prefix", length=P, reparameterize=False)
    perturb(delta)
    theirs = _peft(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    _peft_prefix(delta, theirs)
    _same_generation(_greedy(ours, use_cache=True), _greedy(ours, use_cache=False))
    # generate() counts positions itself: give deltactl's model the counterpart of PEFT's shift by P.
    with torch.no_grad():
        if family == "gpt2":  # absolute positions: token i reads the position row i + P
            table = ours.transformer.wpe.weight
            table.copy_(torch.cat([table[P:], table[:P]]))
        else:  # rotary positions: keys rotated by −P meet queries at i as PEFT's raw keys meet queries at i + P
            for site in delta.controller.sites:
                rows = delta.controller.rows[site_key(site.name)]
                heads, head_dim = site.dims["heads"], site.dims["head_dim"]
                keys = rows.view(P, 2, heads, head_dim)[:, 0]
                cos, sin = ours.model.rotary_emb(keys, torch.full((1, P), -P))
                cos, sin = cos[0, :, None], sin[0, :, None]
                half = head_dim // 2
                rotated = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
                rows.view(P, 2, heads, head_dim)[:, 0] = keys * cos + rotated * sin
    _against_peft_generate(ours, theirs)
