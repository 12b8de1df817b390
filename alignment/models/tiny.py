"""Offline tiny twins: real architecture classes at toy size, with a locally trained tokenizer.

A twin is built from the model config's `architecture` facts (the same fields that describe the real
7B/72B checkpoints), so the code path that trains it is the one that trains the real model. Builds are
cached under `$ALIGNMENT_CACHE` (default `~/.cache/alignment`) in a directory named by a fingerprint of
everything that determines the weights and tokenizer, published once and verified (alignment/records/cache.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from alignment.records.cache import cache_root, publish_once
from alignment.config.schema import FIXTURES_DIR, ModelConfig, as_dict
from alignment.models.templates import CHATML_TEMPLATE

log = logging.getLogger(__name__)

# Bump when the builder's output changes for the same inputs, so stale caches are not reused.
BUILDER_VERSION = 1

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
# A pad distinct from EOS, so the EOS label is never masked; the twin's tokenizer carries it (and ChatML).
PAD_TOKEN = "<|endoftext|>"

# Plain prose so that the tokenizer also covers ordinary words, not only the arithmetic fixtures.
_PROSE = (
    "You are a helpful assistant. Please answer the question below clearly and correctly. "
    "The quick brown fox jumps over the lazy dog. Here is a short explanation of the result. "
    "Thank you for asking; let me know if you have another question about numbers, words or code."
)


def _corpus() -> list[str]:
    texts = [_PROSE] * 4
    for path in sorted(FIXTURES_DIR.glob("*/*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            for key in ("messages", "chosen", "rejected"):
                for message in row.get(key, []):
                    texts.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
    return texts


def fingerprint(model: ModelConfig, seed: int) -> str:
    spec = {
        "architecture": as_dict(model.architecture),
        "tokenizer": {"padding_side": model.tokenizer.padding_side, "pad": PAD_TOKEN, "eos": EOS_TOKEN},
        "seed": seed,
        "builder": BUILDER_VERSION,
        "corpus": hashlib.sha256("".join(_corpus()).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def tiny_model_dir(model: ModelConfig, seed: int) -> Path:
    return cache_root() / "tiny" / f"{model.name}-{fingerprint(model, seed)}"


def build_tokenizer(vocab_size: int, padding_side: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side=padding_side,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(model: ModelConfig, tokenizer, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    arch = model.architecture.stated()  # null facts: the class default
    model_type = arch.pop("model_type")
    if len(tokenizer) > arch["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size is {arch['vocab_size']}")
    config = AutoConfig.for_model(
        model_type,
        **arch,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    network = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    network.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    return network


def ensure_tiny_model(model: ModelConfig, seed: int) -> Path:
    """Return the directory of the tiny twin for this config and seed, built on first use (once, however many
    runs start together) and verified against its manifest on every first use in a process."""

    def build(staging: Path) -> None:
        log.info("building tiny twin %s (seed %d) into %s", model.name, seed, tiny_model_dir(model, seed))
        tokenizer = build_tokenizer(model.architecture.vocab_size, model.tokenizer.padding_side)
        build_model(model, tokenizer, seed).save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return publish_once(tiny_model_dir(model, seed), build, "tiny twin")
