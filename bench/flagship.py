"""A checkpoint shaped as Phi-3-mini-4k-instruct, with seeded random weights (issue 16).

Speed, memory and overheads do not depend on the weights' values, so this checkpoint measures
what the flagship costs on this machine although its weights cannot be downloaded here. It has
the real `Phi3Config` (3.8B parameters, 4k context), bf16 weights, and a tokenizer of Phi-3's
shape: a SentencePiece BPE model of 32,000 pieces with byte fallback (llama.cpp's Phi-3 converter
reads `tokenizer.model`), Phi-3's eleven added tokens at 32000-32010 and its chat template. The
config's vocabulary is 32,064 rows, as Phi-3's; the rows past the added tokens get tokens of their
own (`<|unused32011|>`…), so every id a random model emits is a token of the tokenizer.

The end-of-turn rows of the output layer are zero, so greedy decoding never ends a turn: every
run decodes as many tokens as it asks for, whatever the runtime (on top of the search options'
`min_length` where a runtime takes one).

The checkpoint is built once into the bench's cache folder (about 7.6 GB) and reused:

    python -m bench.flagship [--dest DIR] [--seed 0] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from harness.templates import PHI3_CHAT_TEMPLATE

# config.json of microsoft/Phi-3-mini-4k-instruct.
PHI3_MINI_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32064,
}
SENTENCEPIECE_VOCAB = 32000
# Phi-3's added tokens, ids 32000-32010 in this order.
PHI3_ADDED_TOKENS = (
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
)  # fmt: skip
END_OF_TURN = ("<|endoftext|>", "<|assistant|>", "<|end|>")  # generation_config's eos_token_id
SHARD_BYTES = 2 * 10**9
COMPLETE = ".complete"


def bench_cache() -> Path:
    """Where the bench keeps what it builds once: $SLMKIT_BENCH_CACHE, else ~/.cache/slmkit/bench."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slmkit" / "bench"
    return Path(os.environ.get("SLMKIT_BENCH_CACHE", default))


def synthetic_corpus(seed: int, words: int = 400_000) -> Iterator[str]:
    """Lines of made-up words, varied enough for 32,000 BPE pieces; plus chat markup's plain text."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "st", "tr"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    codas = ["", "n", "r", "s", "t", "l", "m", "nd", "st"]
    line: list[str] = []
    for _ in range(words):
        word = "".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(rng.randint(1, 4)))
        line.append(word.capitalize() if rng.random() < 0.1 else word)
        if len(line) >= 12:
            yield " ".join(line) + rng.choice([".", ",", "?", "!", ""])
            line = []


def train_sentencepiece(dest: Path, seed: int) -> Path:
    """`dest/tokenizer.model`: BPE with Llama's layout (<unk> 0, <s> 1, </s> 2, byte fallback)."""
    import sentencepiece

    model_prefix = dest / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=synthetic_corpus(seed),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=SENTENCEPIECE_VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    (dest / "tokenizer.vocab").unlink()
    return dest / "tokenizer.model"


def save_tokenizer(dest: Path, seed: int) -> list[int]:
    """Phi-3's tokenizer shape into `dest`; returns the end-of-turn token ids."""
    from transformers import AutoTokenizer

    train_sentencepiece(dest, seed)
    # transformers builds the fast tokenizer from tokenizer.model, as for Phi-3's own files.
    settings = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "add_eos_token": False}
    (dest / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = AutoTokenizer.from_pretrained(dest)
    tokenizer.add_special_tokens({"additional_special_tokens": list(PHI3_ADDED_TOKENS)})
    padding = [f"<|unused{i}|>" for i in range(len(tokenizer), PHI3_MINI_CONFIG["vocab_size"])]
    tokenizer.add_tokens(padding, special_tokens=True)
    first_added = tokenizer.convert_tokens_to_ids(PHI3_ADDED_TOKENS[0])
    if len(tokenizer) != PHI3_MINI_CONFIG["vocab_size"] or first_added != PHI3_MINI_CONFIG["eos_token_id"]:
        raise RuntimeError(f"tokenizer of {len(tokenizer)} tokens, <|endoftext|> at {first_added}: not Phi-3's shape")
    tokenizer.eos_token, tokenizer.pad_token = "<|endoftext|>", "<|endoftext|>"
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    tokenizer.model_max_length = PHI3_MINI_CONFIG["max_position_embeddings"]
    tokenizer.save_pretrained(dest)
    return [tokenizer.convert_tokens_to_ids(token) for token in END_OF_TURN]


def random_tensor(name: str, shape: tuple[int, ...], seed: int, silent_rows: list[int]):
    """One bf16 weight: ones for norms, else N(0, 0.02) seeded by the tensor's name; the output
    layer's end-of-turn rows are zero."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    tensor = torch.empty(shape, dtype=torch.float32).normal_(
        0.0, PHI3_MINI_CONFIG["initializer_range"], generator=generator
    )
    if name == "lm_head.weight":
        tensor[silent_rows] = 0.0
    return tensor.to(torch.bfloat16)


def save_random_weights(config, dest: Path, seed: int, silent_rows: list[int]) -> int:
    """Safetensors shards of at most SHARD_BYTES and their index, written one shard at a time, so
    memory holds one shard (not the 7.6 GB model); returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Phi3ForCausalLM(config).state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], seed, silent_rows) for name in names}
        save_file(tensors, str(dest / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(2 * int(torch.Size(shape).numel()) for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total // 2


def build_phi3_mini(dest: Path, seed: int = 0, layers: int = PHI3_MINI_CONFIG["num_hidden_layers"]) -> Path:
    """The flagship-shaped checkpoint in `dest`, built unless a complete one is there already.

    `layers` below 32 cuts the model to its first layers, every other size kept: the largest part
    that fits where a tool cannot hold the whole model (onnxruntime-genai's int4 builder as it
    ships peaked at 22.7 GiB of a 24 GiB machine at 32 layers; node by node, 9.9 GiB). Built in
    a sibling folder and renamed when complete, so an interrupted build never passes for a
    checkpoint."""
    from transformers import GenerationConfig, Phi3Config

    if (dest / COMPLETE).is_file():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.perf_counter()
    end_ids = save_tokenizer(partial, seed)
    values = {**PHI3_MINI_CONFIG, "num_hidden_layers": layers}
    config = Phi3Config(**{k: v for k, v in values.items() if k != "architectures"})
    config.architectures = PHI3_MINI_CONFIG["architectures"]
    config.save_pretrained(partial)
    GenerationConfig(bos_token_id=1, eos_token_id=end_ids, pad_token_id=32000).save_pretrained(partial)
    parameters = save_random_weights(config, partial, seed, end_ids)
    facts = {"seed": seed, "layers": layers, "parameters": parameters}
    facts["build_seconds"] = round(time.perf_counter() - started, 1)
    (partial / COMPLETE).write_text(json.dumps(facts))
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, help="default: the bench cache's phi3-mini-random[-<layers>l]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=PHI3_MINI_CONFIG["num_hidden_layers"])
    args = parser.parse_args()
    full = args.layers == PHI3_MINI_CONFIG["num_hidden_layers"]
    dest = args.dest or bench_cache() / ("phi3-mini-random" if full else f"phi3-mini-random-{args.layers}l")
    folder = build_phi3_mini(dest, args.seed, args.layers)
    print(folder, (folder / COMPLETE).read_text())


if __name__ == "__main__":
    main()
