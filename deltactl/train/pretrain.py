"""Span-corruption pre-training of small T5 models (Raffel et al. 2020, §3.1.4) on the text of the data folder.

The objective: drop 15 % of the tokens of a chunk in spans of mean length 3; the input keeps the other tokens and
puts one sentinel where each span was; the target lists each sentinel followed by the tokens it replaced, then
end-of-sequence::

    text    : the cat sat on the mat today
    input   : [CLS] the <s0> on the mat <s1> [SEP]
    target  : <s0> cat sat <s1> today [SEP]

Tokenizer and special ids (a T5 needs pad, eos and sentinels; the checkpoint ships MiniLM's WordPiece tokenizer,
the one available offline): pad = decoder start = ``[PAD]`` (0, as in T5), eos = ``[SEP]`` (102), and sentinel i
(T5's ``<extra_id_i>``) = ``[unused{i}]`` — WordPiece's reserved, never-produced tokens. Inputs start with
``[CLS]`` as the tokenizer writes them, so fine-tuning inputs (``deltactl.train.models.text_to_text``) look like
pre-training inputs; fine-tuning targets come out as ``[CLS] word [SEP]``, which the decoder learns at once.

The corpus: every text (``text_a`` and ``text_b``) of the *training* splits of the full tasks in the data folder,
deduplicated, tokenized and packed into chunks — dev and test texts are never seen, so later evaluations on them
stay clean. Checkpoints are ordinary ``transformers`` folders (``save_pretrained``: config, safetensors
weights, tokenizer) plus ``pretrain.json`` with the settings and the loss curve.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
SENTINELS = 100

# name: (d_model, d_kv, heads, d_ff, layers) — small enough for CPU pre-training; "tiny" is for tests
SIZES = {
    "tiny": (32, 8, 4, 64, 2),
    "xs": (64, 16, 4, 256, 2),
    "s": (128, 32, 4, 512, 3),
    "m": (256, 32, 8, 1024, 4),
}


@dataclass(frozen=True)
class PretrainConfig:
    size: str = "xs"
    steps: int = 300
    batch_size: int = 32
    length: int = 64  # tokens per chunk before corruption
    lr: float = 1e-3
    warmup: float = 0.05
    seed: int = 0
    log_every: int = 25
    held_out: int = 64  # chunks kept aside to measure the loss on text not trained on
    tasks: tuple[str, ...] | None = None  # whose training texts form the corpus; None: every full task
    max_texts: int | None = None  # at most this many distinct texts (in task order); None: all

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"unknown pre-training size {self.size!r}; sizes: {', '.join(SIZES)}")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.length < 8:
            raise ValueError(f"length must be at least 8 tokens to corrupt spans in, got {self.length}")


def default_dir(size: str) -> Path:
    from deltactl.tasks.data import cache_root

    return cache_root() / f"t5-{size}"


def t5_for(size: str, tokenizer) -> T5Config:
    """The T5 config of a size, with the tokenizer's vocabulary and special ids (see the module docstring)."""
    d_model, d_kv, heads, d_ff, layers = SIZES[size]
    return T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, num_heads=heads, d_ff=d_ff, num_layers=layers,
        num_decoder_layers=layers, feed_forward_proj="relu", tie_word_embeddings=True, dropout_rate=0.1,
        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )


def sentinel_ids(tokenizer, n: int = SENTINELS) -> list[int]:
    """T5's <extra_id_i> as WordPiece's ``[unused{i}]`` tokens."""
    ids = tokenizer.convert_tokens_to_ids([f"[unused{i}]" for i in range(n)])
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"the tokenizer has fewer than {n} [unused] tokens to serve as sentinels")
    return ids


def noise_mask(length: int, generator: torch.Generator, density: float = NOISE_DENSITY,
               mean_span: float = MEAN_SPAN) -> torch.Tensor:
    """T5's random_spans_noise_mask: round(density·length) noise tokens in round(noise/mean_span) spans.

    Noise and non-noise span lengths are random compositions of their totals; the sequence starts with a
    non-noise span and alternates, so spans never touch. Returns a bool mask of ``length``.
    """
    noise = min(max(round(length * density), 1), length - 1)
    spans = max(round(noise / mean_span), 1)

    def split(total: int) -> torch.Tensor:  # a uniformly random composition of total into `spans` positive parts
        cuts = torch.randperm(total - 1, generator=generator)[: spans - 1].sort().values + 1
        edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])
        return edges.diff()

    noise_lengths, keep_lengths = split(noise), split(length - noise)
    mask = torch.zeros(length, dtype=torch.bool)
    start = 0
    for keep, drop in zip(keep_lengths.tolist(), noise_lengths.tolist()):
        start += keep
        mask[start : start + drop] = True
        start += drop
    return mask


def corrupt(tokens: list[int], mask: torch.Tensor, sentinels: list[int]) -> tuple[list[int], list[int]]:
    """(input, target) of span corruption: a masked span → one sentinel in the input, sentinel + span in the target."""
    inputs, target, k, previous = [], [], -1, False
    for token, masked in zip(tokens, mask.tolist()):
        if masked:
            if not previous:
                k += 1
                inputs.append(sentinels[k])
                target.append(sentinels[k])
            target.append(token)
        else:
            inputs.append(token)
        previous = masked
    return inputs, target


def corpus(tokenizer, data=None, tasks=None, max_texts: int | None = None) -> list[int]:
    """Token ids of the distinct training texts of ``tasks`` (default: every full, non-topic task), concatenated
    and [SEP]-separated."""
    from deltactl.tasks import get_task
    from deltactl.tasks.registry import SPECS, resolve_name

    names = [resolve_name(t) for t in tasks] if tasks else [n for n, spec in SPECS.items() if not spec.topic]
    texts = {}
    for name in names:
        if SPECS[name].topic:  # topic sets have dev/test only: never pre-train on evaluation text
            raise ValueError(f"{name} is a topic set without a train split; pre-train on full tasks only")
        for example in get_task(name, data=data).train:
            for text in (example.text_a, example.text_b):
                if text:
                    texts[text] = None
    texts = list(texts)[:max_texts] if max_texts else list(texts)
    stream = []
    for start in range(0, len(texts), 2048):
        for ids in tokenizer(texts[start : start + 2048], add_special_tokens=False)["input_ids"]:
            stream += ids + [tokenizer.sep_token_id]
    return stream


def batches(chunks: list[list[int]], config: PretrainConfig, tokenizer, sentinels, generator):
    """Endless padded (input_ids, attention_mask, labels) batches of freshly corrupted chunks."""
    while True:
        order = torch.randperm(len(chunks), generator=generator).tolist()
        for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
            yield collate([chunks[i] for i in order[start : start + config.batch_size]], tokenizer, sentinels,
                          generator)


def collate(chunk_list, tokenizer, sentinels, generator) -> dict:
    pairs = [corrupt(chunk, noise_mask(len(chunk), generator), sentinels) for chunk in chunk_list]
    sources = [[tokenizer.cls_token_id, *src, tokenizer.sep_token_id] for src, _ in pairs]
    targets = [[*tgt, tokenizer.sep_token_id] for _, tgt in pairs]

    def pad(rows, value):
        width = max(map(len, rows))
        return torch.tensor([row + [value] * (width - len(row)) for row in rows])

    input_ids = pad(sources, tokenizer.pad_token_id)
    labels = pad(targets, -100)
    return {"input_ids": input_ids, "attention_mask": (input_ids != tokenizer.pad_token_id).long(), "labels": labels}


def pretrain(config: PretrainConfig, out=None, data=None, tokenizer_path: str | None = None, progress=print) -> dict:
    """Pre-train a T5 of ``config.size`` with span corruption; save it to ``out``; returns the record."""
    from deltactl.train.run import default_model_path

    out = Path(out) if out else default_dir(config.size)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or default_model_path(), local_files_only=True)
    sentinels = sentinel_ids(tokenizer)
    stream = corpus(tokenizer, data, config.tasks, config.max_texts)
    chunks = [stream[i : i + config.length] for i in range(0, len(stream) - config.length + 1, config.length)]
    if len(chunks) < config.held_out + config.batch_size:
        raise ValueError(f"the corpus gives only {len(chunks)} chunks of {config.length} tokens; "
                         f"need at least held_out + batch_size = {config.held_out + config.batch_size}")
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(chunks), generator=generator).tolist()
    held = [chunks[i] for i in order[: config.held_out]]
    train_chunks = [chunks[i] for i in order[config.held_out :]]
    torch.manual_seed(config.seed)
    model = T5ForConditionalGeneration(t5_for(config.size, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    warm = max(1, round(config.warmup * config.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (config.steps - s) / max(1, config.steps - warm))))
    held_batch = collate(held, tokenizer, sentinels, torch.Generator().manual_seed(config.seed + 1))

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**held_batch).loss.item()

    log = [{"step": 0, "held_out_loss": held_out_loss()}]
    stream_batches = batches(train_chunks, config, tokenizer, sentinels, generator)
    model.train()
    running = []
    for step in range(1, config.steps + 1):
        loss = model(**next(stream_batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if step % config.log_every == 0 or step == config.steps:
            entry = {"step": step, "train_loss": sum(running) / len(running), "held_out_loss": held_out_loss()}
            model.train()
            running = []
            log.append(entry)
            progress(f"pretrain {config.size}: step {step}/{config.steps} train loss {entry['train_loss']:.3f} "
                     f"held-out loss {entry['held_out_loss']:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "config": asdict(config), "parameters": sum(p.numel() for p in model.parameters()),
        "corpus_tokens": len(stream), "chunks": len(chunks), "sentinels": f"[unused0]..[unused{SENTINELS - 1}]",
        "special_ids": {"pad": tokenizer.pad_token_id, "decoder_start": tokenizer.pad_token_id,
                        "eos": tokenizer.sep_token_id, "sentinel_0": sentinels[0]},
        "log": log, "seconds": round(time.perf_counter() - started, 1),
        "tokens_seen": config.steps * config.batch_size * config.length,
        "perplexity_held_out": math.exp(min(log[-1]["held_out_loss"], 50.0)),
    }
    (out / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def pretrained(config: PretrainConfig, out=None, data=None) -> tuple[Path, dict]:
    """(folder, record) of a checkpoint pre-trained with exactly ``config``: the one in ``out`` (default
    ``default_dir(config.size)``) when its pretrain.json holds the same settings, else pre-trained there now.

    Studies share checkpoints this way: the same settings are trained once, whichever study asks first.
    """
    folder = Path(out) if out else default_dir(config.size)
    stored = folder / "pretrain.json"
    wanted = json.loads(json.dumps(asdict(config)))  # tuples → lists, as stored
    if stored.exists():
        record = json.loads(stored.read_text())
        if record["config"] == wanted:
            return folder, record
    return folder, pretrain(config, folder, data=data)
