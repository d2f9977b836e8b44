"""The T5 site map, site selection errors, the rollout, and the memory and sequence mechanisms against formulas."""

import math

import pytest
import torch
from conftest import VOCAB, tiny_batch, tiny_t5

import deltactl as dc
from deltactl.backbones.sites import select


def test_site_map_of_both_t5_versions():
    v10 = dc.backbone_for(tiny_t5()).sites
    v11 = dc.backbone_for(tiny_t5(feed_forward_proj="gated-gelu")).sites
    assert {"encoder.0.ffn.wi", "decoder.1.cross.kv", "decoder.1.cross.q", "encoder.1.out"} <= set(v10)
    assert {"encoder.0.ffn.wi_0", "encoder.0.ffn.wi_1"} <= set(v11) and "encoder.0.ffn.wi" not in v11
    assert not any(n.startswith("encoder.") and ".cross." in n for n in v10)
    assert v10["encoder.0.attn.q"].module == "encoder.block.0.layer.0.SelfAttention.q"
    assert v10["decoder.0.cross.kv"].module == "decoder.block.0.layer.1.EncDecAttention"
    assert v10["decoder.0.ffn.wo"].module == "decoder.block.0.layer.2.DenseReluDense.wo"
    kinds = [s.kind for s in v10.values()]
    # per encoder block: attn (ln, q, k, v, kv, o, out) + ffn (ln, wi, wo, out) + out; the decoder adds cross.
    assert kinds.count("memory") == 2 + 2 * 2 and kinds.count("sequence") == 1
    assert len([k for k in kinds if k != "parameter"]) == 1 + 2 * 12 + 2 * 19 + 2


def test_parameter_sites_cover_every_weight_once_under_canonical_names():
    model = tiny_t5()
    sites = {n: s for n, s in dc.backbone_for(model).sites.items() if s.kind == "parameter"}
    assert sum(math.prod(s.dims["shape"]) for s in sites.values()) == sum(p.numel() for p in model.parameters())
    assert sites["encoder.0.attn.q.weight"].module == "encoder.block.0.layer.0.SelfAttention.q"
    assert sites["decoder.1.cross.ln.weight"].dims["shape"] == (16,)
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in sites  # no canonical module
    # the embedding is shared by both stacks (and the head where tied): one site acting in every owner
    owners = {path for path, _ in sites["shared.weight"].dims["owners"]}
    assert {"shared", "encoder.embed_tokens", "decoder.embed_tokens"} <= owners


def test_wide_heads_dimensions():
    sites = dc.backbone_for(tiny_t5(d_kv=6, num_heads=3)).sites
    assert sites["encoder.0.attn.q"].dims == {"in": 16, "out": 18}
    assert sites["encoder.0.attn.o"].dims == {"in": 18, "out": 16}
    assert sites["decoder.1.cross.kv"].dims["heads"] == 3


def test_unknown_site_names_the_closest_valid_ones():
    sites = dc.backbone_for(tiny_t5()).sites
    with pytest.raises(ValueError, match=r"'encoder\.0\.atn\.q' matches no linear site.*encoder\.0\.attn\.q"):
        select(["encoder.0.atn.q"], sites, {"linear"}, "lora")
    with pytest.raises(ValueError, match=r"matches only memory sites .* but lora acts on linear sites"):
        select(["*.kv"], sites, {"linear"}, "lora")
    with pytest.raises(ValueError, match=r"cross\.q. matches no linear site.*closest valid names: encoder\.0\.attn\.q"):
        dc.attach(tiny_t5(encoder_only=True), "lora", sites=("*.cross.q",))


def test_bad_method_and_option_errors():
    with pytest.raises(ValueError, match="unknown delta method 'lorra'; did you mean lora"):
        dc.attach(tiny_t5(), "lorra")
    with pytest.raises(TypeError, match="lora has no option 'rank'; its options are sites, r, alpha"):
        dc.attach(tiny_t5(), "lora", rank=4)
    with pytest.raises(ValueError, match="model_type 'mamba'.*supported: t5, bert"):
        dc.backbone_for(type("M", (), {"config": type("C", (), {"model_type": "mamba"})()})())


def test_rollout_is_the_residual_trajectory():
    model, batch = tiny_t5(), tiny_batch()
    traj = dc.backbone_for(model).rollout(**batch)
    assert len(traj["encoder"]) == len(traj["decoder"]) == 3
    out = traj.output
    torch.testing.assert_close(model.encoder.final_layer_norm(traj["encoder"][-1]), out.encoder_last_hidden_state)
    torch.testing.assert_close(traj["encoder"][0], model.shared(batch["input_ids"]))
    # a controller on the state leaving encoder block 0 changes h⁽¹⁾ and not h⁽⁰⁾
    delta = dc.attach(model, "adapter", r=2, sites=("encoder.0.out",))
    with torch.no_grad():
        for p in delta.parameters():
            p.fill_(0.1)
    controlled = dc.backbone_for(model).rollout(**batch)
    torch.testing.assert_close(controlled["encoder"][0], traj["encoder"][0])
    h1 = traj["encoder"][1]
    torch.testing.assert_close(controlled["encoder"][1], delta.controller.control("encoder.0.out", None, h1))


def _manual_attention(attn, h, mem_k, mem_v, bias_tokens, bias_memory):
    """softmax([q Kₚᵀ + bₚ, q Kᵀ + b]) [Vₚ; V] Wₒ, written out."""
    b, t, _ = h.shape
    split = lambda x: x.view(b, t, attn.n_heads, attn.key_value_proj_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.q(h)), split(attn.k(h)), split(attn.v(h))
    keys, values = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
    scores = q @ keys.transpose(-1, -2) + torch.cat([bias_memory, bias_tokens], -1)
    out = torch.softmax(scores, -1) @ values
    return attn.o(out.transpose(1, 2).reshape(b, t, -1))


def test_prefix_attention_equals_the_concatenated_keys_formula():
    model = tiny_t5()
    delta = dc.attach(model, "prefix", length=3, reparameterize=False, sites=("encoder.0.attn.kv",))
    attn = model.encoder.block[0].layer[0].SelfAttention
    h = torch.randn(2, 5, 16, dtype=torch.float64)
    mem_k, mem_v = delta.controller.control("encoder.0.attn.kv", 2)
    # memory rows sit at positions -3, -2, -1 before the 5 tokens (bidirectional buckets)
    positions = torch.arange(-3, 5)
    rel = positions[None, :] - torch.arange(5)[:, None]
    buckets = attn._relative_position_bucket(rel, True, attn.relative_attention_num_buckets,
                                             attn.relative_attention_max_distance)
    bias = attn.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)
    expected = _manual_attention(attn, h, mem_k, mem_v, bias[..., 3:], bias[..., :3])
    got = attn(h, position_bias=None)[0]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_prompt_rows_equal_prepended_tokens():
    """A soft prompt equal to the embeddings of tokens t₁…tₚ is the model run on [t₁…tₚ; x]."""
    model, batch = tiny_t5(), tiny_batch()
    tokens = torch.tensor([5, 9, 13])
    delta = dc.attach(model, "prompt", length=3)
    with torch.no_grad():
        delta.controller.layers["encoder__embed"].rows.copy_(model.shared.weight[tokens])
    prompted = model(**batch).logits
    delta.detach()
    ids = torch.cat([tokens.expand(2, -1), batch["input_ids"]], 1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), batch["attention_mask"]], 1)
    plain = model(input_ids=ids, attention_mask=mask, decoder_input_ids=batch["decoder_input_ids"]).logits
    torch.testing.assert_close(prompted, plain, atol=1e-12, rtol=0)


def test_prompt_init_copies_vocabulary_rows():
    model = tiny_t5()
    rows = dc.attach(model, "prompt", length=4, init_vocab_size=VOCAB).controller.layers["encoder__embed"].rows
    assert all(any(torch.equal(r, e) for e in model.shared.weight) for r in rows)


def test_two_memory_controllers_and_detach_order():
    model, batch = tiny_t5(), tiny_batch()
    before = model(**batch).logits
    a = dc.attach(model, "prefix", length=2, reparameterize=False)
    b = dc.attach(model, "prefix", length=1, reparameterize=False, sites=("decoder.*.cross.kv",))
    assert b.name == "prefix_2"
    a.detach()
    assert model.decoder.config._attn_implementation == "deltactl_eager"  # b still acts in the decoder
    b.detach()
    assert model.decoder.config._attn_implementation == "eager"
    torch.testing.assert_close(model(**batch).logits, before, atol=0, rtol=0)
