"""Tiny models for tests, built in seconds with no network.

The tiny Phi-3 is random: its answers are nonsense but deterministic, which is what parity,
usage and serving tests need. Its BPE tokenizer is trained in-process and carries Phi-3's chat
template, so the whole chat path (template, special tokens, stop tokens) runs as for the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.templates import PHI3_CHAT_TEMPLATE
from slmkit.models.onnx_wrapper import ONNX_ARTIFACT
from slmkit.workflow.lineage import CHECKPOINT_ARTIFACT, GGUF_ARTIFACT

SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TRAINING_TEXT = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Two plus two is four. A week has seven days. The sky is blue.",
    "Hello, how are you today? I am a helpful assistant. Answer briefly.",
    "What is the capital of Italy? Rome. Which planet is red? Mars.",
]


def tiny_tokenizer(chat_template: str | None, special_tokens: list[str] = SPECIAL_TOKENS) -> Any:
    """A byte-level BPE tokenizer trained in-process on a few sentences (320 tokens), with
    `chat_template` (None leaves it without one, as a base model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special_tokens[1],
        eos_token=special_tokens[2],
        unk_token=special_tokens[0],
        pad_token=special_tokens[2],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_tiny_phi3(
    dest: Path, seed: int = 0, context_length: int = 512, tied: bool = False, sliding_window: int | None = None
) -> Path:
    """Write a random 2-layer Phi-3 checkpoint (hidden size 64) with its tokenizer to `dest`.

    `original_max_position_embeddings` equals `max_position_embeddings`: the onnxruntime-genai
    builder requires it for the 4k variant. The end-of-turn tokens' output rows are damped so
    greedy answers run to their token limit instead of stopping at the first token. `tied` shares
    the embedding with the output layer, as SmolLM2 does.
    """
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    fast = tiny_tokenizer(PHI3_CHAT_TEMPLATE)
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
        sliding_window=sliding_window,
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


# The GGUF architecture llama.cpp's converter writes each checkpoint class as (a Mistral as `llama`,
# as real Mistral GGUFs are: gguf has no `mistral` architecture).
GGUF_ARCHITECTURES = {
    "Phi3ForCausalLM": "PHI3",
    "LlamaForCausalLM": "LLAMA",
    "MistralForCausalLM": "LLAMA",
    "Qwen2ForCausalLM": "QWEN2",
    "Qwen3ForCausalLM": "QWEN3",
    "Gemma3ForCausalLM": "GEMMA3",
}


def llama_permute(weight: Any, heads: int) -> Any:
    """llama.cpp's `LlamaModel.permute` of q and k rows, which transformers' GGUF loader undoes."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_tiny_gguf(checkpoint: Path, dest: Path, quantization: str, types: dict[str, str] | None = None) -> Path:
    """Write a tiny checkpoint as a GGUF file, as llama.cpp's converter lays it out: tensor names
    from gguf's own name map for its architecture, its metadata, the byte-level BPE tokenizer and
    chat template, q and k rows permuted for Llama, Gemma's norms stored as weight + 1, and its 2-D
    weights quantized by the gguf package (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`, `F16`), those
    whose GGUF name contains a key of `types` in that type instead (as llama-quantize mixes them)."""
    import json

    import gguf
    from safetensors.numpy import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    template = json.loads((checkpoint / "tokenizer_config.json").read_text()).get("chat_template")
    if template is None and (checkpoint / "chat_template.jinja").is_file():
        template = (checkpoint / "chat_template.jinja").read_text()
    arch = gguf.MODEL_ARCH[GGUF_ARCHITECTURES[config["architectures"][0]]]
    qtype = gguf.GGMLQuantizationType[quantization]
    layers, heads, kv_heads = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    names = gguf.get_tensor_name_map(arch, layers)
    writer = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = config["rope_parameters"]
    writer.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    if config.get("sliding_window") and arch == gguf.MODEL_ARCH.GEMMA3:
        writer.add_sliding_window(config["sliding_window"])
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    special = {token["id"] for token in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["pad_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    # As real files record it: transformers gives a Gemma GGUF's tokenizer GemmaTokenizer's class,
    # which refuses to encode without an unknown token.
    unknown = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}.get("<unk>")
    if unknown is not None:
        writer.add_unk_token_id(unknown)
    if template:
        writer.add_chat_template(template)
    for hf_name, weight in sorted(load_file(checkpoint / "model.safetensors").items()):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        suffix = ".bias" if hf_name.endswith(".bias") else ".weight"
        name = f"{names.get_name(hf_name.removesuffix(suffix))}{suffix}"
        weight = weight.astype("float32")
        if arch == gguf.MODEL_ARCH.GEMMA3 and name.endswith("norm.weight"):
            weight = weight + 1
        if arch == gguf.MODEL_ARCH.LLAMA and ".attn_q." in name:
            weight = llama_permute(weight, heads)
        if arch == gguf.MODEL_ARCH.LLAMA and ".attn_k." in name:
            weight = llama_permute(weight, kv_heads)
        if weight.ndim == 2:
            own = next((gguf.GGMLQuantizationType[t] for part, t in (types or {}).items() if part in name), qtype)
            writer.add_tensor(name, gguf.quants.quantize(weight, own), raw_dtype=own)
        else:
            writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


# A ChatML turn format (Qwen's), for the tiny models of other architectures than Phi-3.
CHATML_TOKENS = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# One tiny configuration per architecture of slmkit.sources.architectures: 2 layers, hidden size
# 64 and 4 heads (2 of them for keys and values), with each architecture's own features on
# (Qwen2's q/k/v biases, Qwen3's and Gemma 3's q/k norms, Gemma 3's sliding layers and two rope
# bases, Mistral's window). No projection is as wide as the vocabulary: the builder takes any
# such MatMul for the output layer.
TINY_ARCHITECTURES = {
    "LlamaForCausalLM": ("LlamaConfig", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
    "MistralForCausalLM": ("MistralConfig", {"head_dim": 16, "sliding_window": 4}),
    "Qwen2ForCausalLM": ("Qwen2Config", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    # head_dim 128, as every Qwen3: transformers' GGUF loader does not read it from the file.
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 128, "tie_word_embeddings": True}),
    "Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        {"head_dim": 16, "sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 24,
         "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    ),
}  # fmt: skip


def build_tiny_model(architecture: str, dest: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random 2-layer checkpoint of `architecture` (a TINY_ARCHITECTURES key, its config
    changed by `overrides`) with a ChatML tokenizer to `dest`. Norm weights are perturbed so that
    no norm is the identity."""
    import torch
    import transformers

    fast = tiny_tokenizer(CHATML_TEMPLATE, CHATML_TOKENS)
    config_class, features = TINY_ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(
        vocab_size=len(fast), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, **{**features, **overrides},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
        model.get_output_embeddings().weight[fast.eos_token_id] *= 0.01  # answers run to their limit
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    fast.save_pretrained(dest)
    return dest


# Runs the builder's own command line once per argv given as JSON, in one process, as the steps
# run it (node by node): its imports (torch, transformers, onnx) take ten times the CPU of a tiny build.
ONE_PROCESS_BUILDER = """
import json, sys
from slmkit.onnx.node_by_node_builder import run_builder
for argv in json.loads(sys.argv[1]):
    run_builder(argv)
"""


def build_in_one_process(commands: list[list[str]]) -> None:
    """Run builder command lines (slmkit.onnx.build.builder_command) in one builder process."""
    import json
    import subprocess
    import sys

    from slmkit.onnx.build import BUILDER_MODULE, builder_environment

    assert all(command[1:3] == ["-m", BUILDER_MODULE] for command in commands)
    argvs = [command[3:] for command in commands]
    result = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS_BUILDER, json.dumps(argvs)],
        capture_output=True, text=True, env=builder_environment(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def logged_carry_mismatches(model_dir: Path, download_artifacts: Path, gguf_name: str) -> list[str]:
    """carried_node_mismatches of a logged ONNX wrapper's folder against the GGUF file and the
    checkpoint its `download` run logged (both read in place)."""
    return carried_node_mismatches(
        model_dir / "artifacts" / ONNX_ARTIFACT,
        download_artifacts / GGUF_ARTIFACT / gguf_name,
        download_artifacts / CHECKPOINT_ARTIFACT,
    )


def carried_node_mismatches(folder: Path, gguf_path: Path, checkpoint: Path) -> list[str]:
    """The MatMulNBits nodes of a carried ONNX model whose weights differ from gguf's own
    dequantization of the file's tensors (`checkpoint` gives the config; in its row order, halves taken where the
    builder splits a fused weight); empty when every carried node holds the file's weights.

    Codes, scales and rows are compared exactly in effect: a minimum moved by the recentring
    (slmkit.onnx.gguf_blocks.BlockWeights.recentered) is the only float rounding allowed, a few
    ulps of the row's largest value, where one wrong code moves a value by a whole scale."""
    import json

    import gguf
    import numpy as np
    import onnx

    from slmkit.onnx.gguf_carry import GgufWeights, node_parts, node_weights

    weights = GgufWeights(gguf_path, json.loads((checkpoint / "config.json").read_text()))
    model = onnx.load(str(folder / "model.onnx"))
    mismatches = []
    for node in (node for node in model.graph.node if node.op_type == "MatMulNBits"):
        pieces = []
        for part in node_parts(node.name, weights) or []:
            name = weights.gguf_name(part.hf_name)
            tensor = weights.tensors[name]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            values = values[weights.row_order(name, values.shape[0])]
            pieces.append(values[part.select(values.shape[0])])
        if not pieces or not _same_up_to_rounding(node_weights(model, node), np.concatenate(pieces)):
            mismatches.append(node.name)
    return mismatches


def _same_up_to_rounding(actual, expected) -> bool:
    import numpy as np

    if actual.shape != expected.shape:
        return False
    row_scale = np.abs(expected).max(axis=1, keepdims=True)  # bounds |min| and |scale · code| of each block
    return bool(np.all(np.abs(actual - expected) <= 8 * np.finfo(np.float32).eps * row_scale))
