"""Tiny models for tests, built in seconds with no network.

The tiny Phi-3 is random: its answers are nonsense but deterministic, which is what parity,
usage and serving tests need. Its BPE tokenizer is trained in-process and carries Phi-3's chat
template, so the whole chat path (template, special tokens, stop tokens) runs as for the real one.
"""

from __future__ import annotations

from pathlib import Path

PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TRAINING_TEXT = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Two plus two is four. A week has seven days. The sky is blue.",
    "Hello, how are you today? I am a helpful assistant. Answer briefly.",
    "What is the capital of Italy? Rome. Which planet is red? Mars.",
]


def build_tiny_phi3(dest: Path, seed: int = 0, context_length: int = 512) -> Path:
    """Write a random 2-layer Phi-3 checkpoint (hidden size 64) with its tokenizer to `dest`.

    `original_max_position_embeddings` equals `max_position_embeddings`: the onnxruntime-genai
    builder requires it for the 4k variant. The end-of-turn tokens' output rows are damped so
    greedy answers run to their token limit instead of stopping at the first token.
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
        tie_word_embeddings=False,
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
