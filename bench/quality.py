"""Quality against speed of every ONNX build of one checkpoint, and the llama.cpp peer.

`quantization_figures`: each CPU quantization (and the GGUF carry-over in each activation
precision of slmkit.onnx.gguf_carry.ACTIVATIONS), built from the same download, answers the eval set greedily; exact match is
against transformers in float32 on the same checkpoint, the reference the pipeline serves.

`peer_figures`: our served ONNX model against llama.cpp's `llama-server` on the same GGUF file,
in the same sitting: 1-client and 4-client completion tokens/s and the eval answer-correct rate.
`LLAMA_SERVER` names the binary (bench/README.md: how to build it); without it the figures are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench.figures import (
    PROMPTS,
    Figure,
    aggregate_rate,
    chat_completion,
    decode_rates,
    served_generate,
)
from bench.front import http_first_token_s
from harness.servers import free_port, stop_process, wait_for_http
from slmkit.evaluation.fidelity import MIN_POSITIONS, fidelity, onnx_dir_logits
from slmkit.evaluation.quantization_choice import calibrate, onnx_answers, score_answers
from slmkit.evaluation.scoring import answer_correct
from slmkit.manifest import folder_bytes
from slmkit.onnx.build import QUANTIZATIONS, build_onnx
from slmkit.onnx.gguf_carry import ACTIVATIONS, DEFAULT_ACTIVATIONS, carry_gguf_weights
from slmkit.onnx.greedy import bare_greedy, load
from slmkit.sources.eval_set import EvalRow

LLAMA_SERVER_ENV = "LLAMA_SERVER"

GGUF_DEFAULT = f"gguf, {DEFAULT_ACTIVATIONS} activations"


def build_variants(checkpoint: Path, gguf: Path | None, work: Path) -> dict[str, Path]:
    """Every CPU quantization of `checkpoint`, and the GGUF carry-over in each activation precision."""
    folders = {}
    for name in (q for q, spec in QUANTIZATIONS.items() if "cpu" in spec.providers and not spec.carries_gguf):
        folders[name] = work / name
        build_onnx(name, checkpoint, folders[name], work, "cpu", gguf)
    if gguf is not None:
        for activations in ACTIVATIONS:  # slmkit.onnx.gguf_carry: the activation precisions
            name = f"gguf, {activations} activations"
            folders[name] = work / re.sub(r"[^a-z0-9]+", "-", name).strip("-")
            shutil.copytree(folders["int4"], folders[name])
            carry_gguf_weights(folders[name], gguf, checkpoint, activations)
    return folders


def quantization_figures(
    checkpoint: Path, gguf: Path | None, rows: list[EvalRow], work: Path, max_tokens: int, reps: int
) -> list[Figure]:
    """The quality-against-speed table as one report figure, and the carry-over's targets:
    answers within 0.05 of the source, exact match >= 0.6, decode >= 0.9x today's int4 build."""
    calibration = calibrate(checkpoint, gguf, rows, max_tokens, MIN_POSITIONS)
    reference, reference_correct = calibration.answers, calibration.correct_rate
    folders = build_variants(checkpoint, gguf, work)
    table: dict[str, dict[str, Any]] = {}
    models = {name: load(folder) for name, folder in folders.items()}
    speeds = decode_rates(
        {name: lambda m, k, pair=pair: len(bare_greedy(*pair, m, k)[0]) for name, pair in models.items()},
        max_tokens,
        reps,
        PROMPTS[:2],
    )
    for name, folder in folders.items():
        answers, _ = onnx_answers(folder, rows, max_tokens)
        correct, exact = score_answers(answers, reference, rows)
        scored = fidelity(calibration.sequences, calibration.reference_rows, onnx_dir_logits(folder))
        table[name] = {
            "top1_agreement": scored.top1_agreement,
            "kl_divergence": scored.kl_divergence,
            "size_mib": folder_bytes(folder) / 2**20,
            "exact_match": exact,
            "correct": correct,
            "decode_tok_s": speeds[name],
        }
    del models
    figures = [
        Figure(
            "quality against speed (eval set, greedy, bare loop)",
            len(table),
            {"reference_correct": reference_correct, "rows": len(rows), "builds": table},
        )
    ]
    if gguf is not None:
        carried, int4 = table[GGUF_DEFAULT], table["int4"]
        figures += [
            Figure("gguf correct rate - source's", carried["correct"] - reference_correct, carried),
            Figure("gguf exact match with the source", carried["exact_match"], carried),
            Figure("gguf / int4 decode tok/s", carried["decode_tok_s"] / int4["decode_tok_s"], {"gguf": carried, "int4": int4}),
        ]  # fmt: skip
    return figures


def served_correct_rate(url: str, rows: list[EvalRow], max_tokens: int) -> float:
    """Answer-correct rate of a served chat model on the eval rows, greedy."""
    correct = []
    for row in rows:
        answer = chat_completion(url, row.messages, max_tokens)
        correct.append(answer_correct(answer["choices"][0]["message"]["content"], row.answers))
    return statistics.fmean(correct)


def llama_server(binary: str, gguf: Path, log: Path):
    """`llama-server` on the GGUF, 4 parallel slots and one thread per CPU, as a user runs it."""
    port = free_port()
    threads = str(len(os.sched_getaffinity(0)))
    command = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", "4", "-t", threads]
    command += ["-c", "8192"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    wait_for_http(f"http://127.0.0.1:{port}/health", process, timeout_s=120)
    return process, f"http://127.0.0.1:{port}/v1/chat/completions"


CONVERSATION = [
    "Write a short story about a robot who learns to paint.",
    "Now make it sadder.",
    "Give the robot a name and tell the story again.",
    "What would the robot paint next?",
    "Summarise everything in two sentences.",
    "Translate the summary into French.",
]
# A second client's conversation, whose turns alternate with CONVERSATION's.
OTHER_CONVERSATION = [
    "Explain how a bicycle works to a ten-year-old.",
    "Now explain the gears.",
    "What about the brakes?",
    "How should the child ride safely?",
    "Summarise everything in two sentences.",
    "Translate the summary into French.",
]


def conversation_turns(
    chat_url: str, max_tokens: int, questions: list[str] = CONVERSATION
) -> list[list[dict[str, str]]]:
    """The messages of each turn of one conversation, each turn resending the whole history, as
    a chat client does; the assistant's answers are `chat_url`'s own, so both servers get the
    same requests."""
    history: list[dict[str, str]] = []
    turns = []
    for question in questions:
        history.append({"role": "user", "content": question})
        turns.append(list(history))
        answer = chat_completion(chat_url, history, max_tokens)["choices"][0]["message"]["content"]
        history.append({"role": "assistant", "content": answer})
    return turns


def multi_turn_first_token_s(chat_url: str, turns: list[list[dict[str, str]]], max_tokens: int) -> list[float]:
    """Streamed time to first token of each turn, in order (so a server may reuse the last turn's cache)."""
    return [http_first_token_s(chat_url, {"messages": m, "max_tokens": max_tokens, "temperature": 0}) for m in turns]


def taking_turns_first_token_s(chat_url: str, conversations: list[list[list[dict[str, str]]]], max_tokens: int) -> list[float]:  # fmt: skip
    """Streamed time to first token of each turn of several conversations, their turns taking
    turns (each one's first, then each one's second...), as clients sharing one server do."""
    return multi_turn_first_token_s(
        chat_url, [turn for turns in zip(*conversations, strict=True) for turn in turns], max_tokens
    )


def interleaved_rates(ours_url: str, theirs_url: str, max_tokens: int, rounds: int = 3) -> tuple[dict, dict]:
    """Median aggregate tok/s of each server at 1 and 4 clients (8 requests each), the two
    measured in turn, round after round: one sitting's measurements of one server moved by 20%
    (2026-12-05: 142 and 183 tok/s at 1 client in the same run), and taking turns spreads that
    over both."""
    rates: dict[str, dict[int, list[float]]] = {url: {1: [], 4: []} for url in (ours_url, theirs_url)}
    for _ in range(rounds):
        for url in (ours_url, theirs_url):
            for clients in (1, 4):
                rates[url][clients].append(aggregate_rate(served_generate(url), clients, 8, max_tokens))
    return tuple({k: statistics.median(v) for k, v in rates[url].items()} for url in (ours_url, theirs_url))


def peer_figures(served_url: str, gguf: Path | None, rows: list[EvalRow], work: Path, max_tokens: int) -> list[Figure]:
    """Our served model over llama-server on the same GGUF, at 1 and at 4 clients, same sitting."""
    binary = os.environ.get(LLAMA_SERVER_ENV, "")
    if not binary or gguf is None:
        why = f"{LLAMA_SERVER_ENV} is not set" if not binary else "the source is not a GGUF file"
        print(f"peer figure skipped: {why} (bench/README.md: building llama-server)")
        return []
    process, llama_url = llama_server(binary, gguf, work / "llama-server.log")
    try:
        ours, theirs = interleaved_rates(served_url, llama_url, max_tokens)
        quality = {
            "onnx_correct": served_correct_rate(served_url, rows, max_tokens),
            "llama_server_correct": served_correct_rate(llama_url, rows, max_tokens),
        }
        turns = conversation_turns(served_url, max_tokens)
        first_token = {"onnx_s": multi_turn_first_token_s(served_url, turns, max_tokens),
                       "llama_server_s": multi_turn_first_token_s(llama_url, turns, max_tokens)}  # fmt: skip
        both = [turns, conversation_turns(served_url, max_tokens, OTHER_CONVERSATION)]
        taking_turns = {"onnx_s": taking_turns_first_token_s(served_url, both, max_tokens),
                        "llama_server_s": taking_turns_first_token_s(llama_url, both, max_tokens)}  # fmt: skip
    finally:
        stop_process(process)
    detail = {"onnx_tok_s": ours, "llama_server_tok_s": theirs, **quality}
    last_turn = first_token["onnx_s"][-1] / first_token["llama_server_s"][-1]
    last_turns = sum(taking_turns["onnx_s"][-2:]) / sum(taking_turns["llama_server_s"][-2:])
    return [
        *(Figure(f"served ONNX / llama-server tok/s, {k} client{'s' * (k > 1)}", ours[k] / theirs[k], detail)
          for k in (1, 4)),
        Figure("multi-turn first token, last turn: ONNX / llama-server", last_turn, first_token),
        Figure("two conversations taking turns, last turns' first token: ONNX / llama-server", last_turns, taking_turns),
    ]  # fmt: skip
