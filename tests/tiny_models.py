"""Tiny models for tests, built in seconds with no network.

The tiny Phi-3 is random: its answers are nonsense but deterministic, which is what parity,
usage and serving tests need. Its BPE tokenizer is trained in-process and carries Phi-3's chat
template, so the whole chat path (template, special tokens, stop tokens) runs as for the real one.
"""

from __future__ import annotations

from pathlib import Path

from harness.templates import PHI3_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TRAINING_TEXT = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Two plus two is four. A week has seven days. The sky is blue.",
    "Hello, how are you today? I am a helpful assistant. Answer briefly.",
    "What is the capital of Italy? Rome. Which planet is red? Mars.",
]


def build_tiny_phi3(dest: Path, seed: int = 0, context_length: int = 512, tied: bool = False) -> Path:
    """Write a random 2-layer Phi-3 checkpoint (hidden size 64) with its tokenizer to `dest`.

    `original_max_position_embeddings` equals `max_position_embeddings`: the onnxruntime-genai
    builder requires it for the 4k variant. The end-of-turn tokens' output rows are damped so
    greedy answers run to their token limit instead of stopping at the first token. `tied` shares
    the embedding with the output layer, as SmolLM2 does.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = PHI3_CHAT_TEMPLATE
    end_ids = [fast.eos_token_id, fast.convert_tokens_to_ids("<|end|>")]
    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=context_length,
        original_max_position_embeddings=context_length,
        bos_token_id=fast.bos_token_id,
        eos_token_id=end_ids,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=tied,
    )
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[end_ids] *= 0.01
    model.generation_config.eos_token_id = end_ids
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    fast.save_pretrained(dest)
    return dest


def train_tiny_phi3(dest: Path, conversations: list[tuple[list[dict[str, str]], str]], steps: int = 300) -> Path:
    """Overfit the tiny Phi-3 in `dest` to answer each conversation with its answer.

    A model that really answers a few eval rows lets tests see a promotion gate pass on
    quality and then fail against a worse, untrained candidate, with no metric faked.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    end = "<|end|>"
    batches = []
    for messages, answer in conversations:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + end, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
        batches.append((ids, labels))
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        ids, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(dest)
    return dest


def write_tiny_phi3_gguf(checkpoint: Path, dest: Path, quantization: str) -> Path:
    """Write the Phi-3 checkpoint at `checkpoint` as a GGUF file, as llama.cpp's converter lays it
    out (tensor names from gguf's own name map, `phi3` metadata, the byte-level BPE tokenizer and
    chat template), with its 2-D weights quantized by the gguf package (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`).
    """
    import json

    import gguf
    from safetensors.numpy import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    qtype = gguf.GGMLQuantizationType[quantization]
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, layers)
    writer = gguf.GGUFWriter(str(dest), "phi3")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(layers)
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    special = {token["id"] for token in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["pad_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_chat_template(PHI3_CHAT_TEMPLATE)
    for hf_name, weight in sorted(load_file(checkpoint / "model.safetensors").items()):
        name = f"{names.get_name(hf_name.removesuffix('.weight'))}.weight"
        weight = weight.astype("float32")
        if weight.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
