"""Fidelity beside llama.cpp's on the same positions, and node by node where the divergence comes from.

`fidelity_figures`: transformers float32 (the reference), our ONNX model and `llama-server` on the
same GGUF file are teacher-forced along the same tokens (slmkit.evaluation.fidelity's text windows).
llama-server's `/completion` takes the tokens so far as ids and returns its top-n log-probabilities,
never the whole distribution, so both models are compared the same way: the share of positions
whose top-1 token is the reference's, and the KL divergence over the reference's top TOP_K tokens
with the rest of the vocabulary as one bucket (a lower bound of the full KLD that only needs
those tokens; ours over the whole vocabulary is reported beside it).

`node_figures`: each carried projection's output on the float model's own inputs, computed in
numpy as each arithmetic computes it, against the exact product: llama.cpp's (int8 activations
per 32, the minimum multiplied by the rounded activations' sums) and MatMulNBits' with the codes
stored as they come (zero point 0, minimum added on the exact activations) or recentred
(slmkit.onnx.gguf_blocks.BlockWeights.recentered), at blocks of 32 and 16.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests

from bench.figures import Figure
from slmkit.evaluation.fidelity import (
    WINDOW,
    compare_positions,
    log_softmax,
    onnx_dir_logits,
    scored_rows,
    scored_sequences,
    transformers_logits,
)
from slmkit.evaluation.quantization_choice import float_reference
from slmkit.onnx.gguf_blocks import BlockWeights

TOP_K = 20  # the reference's top tokens the bucketed KLD keeps apart
N_PROBS = 100  # log-probabilities asked of llama-server per position
POSITIONS = 2000

# A position's distribution as {token id: log-probability} over at least the top N_PROBS tokens.
TopLogprobs = dict[int, float]


def top_logprobs(logits: np.ndarray, n: int = N_PROBS) -> list[TopLogprobs]:
    """Each row of full-vocabulary logits as its top-n log-probabilities."""
    log_p = log_softmax(logits)
    top = np.argsort(-log_p, axis=-1)[:, :n]
    return [{int(t): float(row[t]) for t in ids} for row, ids in zip(log_p, top, strict=True)]


def bucketed_kld(reference: np.ndarray, candidate: TopLogprobs, k: int = TOP_K) -> float:
    """KL(P_ref || P_cand) over the reference's top-k tokens and one bucket for all others.

    A token of the reference's top-k missing from the candidate's list gets the smallest
    probability the list has (an upper bound of its own, so the divergence is not overstated)."""
    log_p = reference.astype(np.float64)
    top = np.argsort(-log_p)[:k]
    floor = min(candidate.values())
    p = np.exp(log_p[top])
    q = np.exp(np.array([candidate.get(int(t), floor) for t in top]))
    p_rest, q_rest = max(1.0 - p.sum(), 1e-12), max(1.0 - q.sum(), 1e-12)
    return float(np.sum(p * (log_p[top] - np.log(q))) + p_rest * np.log(p_rest / q_rest))


def llama_server_positions(url: str, ids: list[int], first: int, safe_token: int) -> list[TopLogprobs]:
    """llama-server's next-token log-probabilities after ids[:i+1], for i in first-1 .. len-2.

    One request per position; `cache_prompt` keeps the KV cache of the shared prefix, so each
    request evaluates one new token. The one token generated is forced, by a logit bias, to be
    `safe_token` (a whole UTF-8 character): the server holds back a token that ends inside a
    character, and its probabilities with it. The probabilities are read before sampling, from
    the model's own logits, so the bias does not touch them."""
    rows = []
    for end in range(first, len(ids)):
        body = {"prompt": ids[:end], "n_predict": 1, "n_probs": N_PROBS, "cache_prompt": True, "ignore_eos": True,
                "temperature": 0, "post_sampling_probs": False, "logit_bias": [[safe_token, 1000]]}  # fmt: skip
        response = requests.post(f"{url}/completion", json=body, timeout=60)
        response.raise_for_status()
        answer = response.json()
        if not answer.get("completion_probabilities"):
            raise RuntimeError(f"llama-server gave no probabilities after {end} tokens: {str(answer)[:300]}")
        probabilities = answer["completion_probabilities"][0]["top_logprobs"]
        rows.append({int(entry["id"]): float(entry["logprob"]) for entry in probabilities})
    return rows


def compare_to_reference(reference: list[np.ndarray], candidate: list[list[TopLogprobs]]) -> dict[str, float]:
    """Top-1 agreement and bucketed KLD of a candidate's positions against the reference's log-probs."""
    same, divergence = [], []
    for ref_rows, cand_rows in zip(reference, candidate, strict=True):
        for ref, cand in zip(ref_rows, cand_rows, strict=True):
            same.append(int(np.argmax(ref)) == max(cand, key=cand.get))
            divergence.append(bucketed_kld(ref, cand))
    return {"positions": len(same), "top1_agreement": statistics.fmean(same), "kld_top20": statistics.fmean(divergence)}


def fidelity_figures(checkpoint: Path, gguf: Path | None, onnx_dir: Path, llama_url: str | None) -> list[Figure]:
    """Ours and llama-server's fidelity on the same positions; ratios only when llama-server runs."""
    reference_model, tokenizer = float_reference(checkpoint, gguf)
    sequences = scored_sequences(tokenizer, [], WINDOW, POSITIONS)  # the shipped text alone
    ours_logits = onnx_dir_logits(onnx_dir)
    reference, ours, full_kld = [], [], []
    for ref_rows, our_rows in zip(scored_rows(sequences, transformers_logits(reference_model)),
                                  scored_rows(sequences, ours_logits), strict=True):  # fmt: skip
        reference.append(log_softmax(ref_rows))
        ours.append(top_logprobs(our_rows))
        full_kld.append(compare_positions(ref_rows, our_rows)[1])
    detail: dict[str, Any] = {
        "onnx": {**compare_to_reference(reference, ours), "kld_full": float(np.concatenate(full_kld).mean())}
    }
    if llama_url is None:
        return [Figure("fidelity of the carried model (text positions)", detail["onnx"]["top1_agreement"], detail)]
    safe = tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    theirs = [llama_server_positions(llama_url, ids, first, safe) for ids, first in sequences]
    detail["llama_server"] = compare_to_reference(reference, theirs)
    ours_row, theirs_row = detail["onnx"], detail["llama_server"]
    return [
        Figure(
            "fidelity top-1: ONNX - llama-server", ours_row["top1_agreement"] - theirs_row["top1_agreement"], detail
        ),
        Figure("fidelity KLD: ONNX / llama-server", ours_row["kld_top20"] / theirs_row["kld_top20"], detail),
    ]


# --- node by node ----------------------------------------------------------------------------


def quantize_activations(x: np.ndarray, block: int) -> np.ndarray:
    """int8 per block of `block` values, scale max|x|/127, round to nearest: MLAS's and llama.cpp's
    rule (`quantize_row_q8_0`/`q8_1`), returned dequantized."""
    blocks = x.reshape(x.shape[0], -1, block)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    return (np.round(blocks / np.where(scale == 0, 1, scale)) * scale).reshape(x.shape)


def block_sums(x: np.ndarray, block: int) -> np.ndarray:
    return x.reshape(x.shape[0], -1, block).sum(axis=-1)


def arithmetic_outputs(x: np.ndarray, weights: BlockWeights) -> dict[str, np.ndarray]:
    """One projection's output [tokens, N] on inputs x [tokens, K], as each arithmetic computes it."""
    exact_w = weights.dequantize().astype(np.float64)
    outputs = {"exact": x @ exact_w.T, "llama.cpp (q8 per 32)": quantize_activations(x, 32) @ exact_w.T}
    for name, stored in (("as stored", weights), ("recentred", weights.recentered())):
        for block in (32, 16):
            w = stored.with_block_size(block) if block < stored.block_size else stored
            codes_part = np.repeat(w.scales, w.block_size, axis=1) * (
                w.codes.astype(np.float64) - np.repeat(w.zero_points, w.block_size, axis=1)
            )
            y = quantize_activations(x, block) @ codes_part.T
            if w.mins is not None:
                y = y + block_sums(x, w.min_block_size) @ w.mins.T.astype(np.float64)
            outputs[f"MatMulNBits {name}, int8 per {block}"] = y
    return outputs


def node_errors(inputs: dict[str, np.ndarray], weights: Callable[[str], BlockWeights]) -> dict[str, dict[str, float]]:
    """Per projection kind (q_proj, …, down_proj): the median over layers of each arithmetic's
    relative output error ‖y − y_exact‖ / ‖y_exact‖."""
    errors: dict[str, dict[str, list[float]]] = {}
    for hf_name, x in inputs.items():
        outputs = arithmetic_outputs(x.astype(np.float64), weights(hf_name))
        exact = outputs.pop("exact")
        kind = hf_name.split(".")[-2]
        for arithmetic, y in outputs.items():
            relative = float(np.linalg.norm(y - exact) / np.linalg.norm(exact))
            errors.setdefault(kind, {}).setdefault(arithmetic, []).append(relative)
    return {kind: {a: statistics.median(v) for a, v in by.items()} for kind, by in errors.items()}


def projection_inputs(model: Any, ids: list[int]) -> dict[str, np.ndarray]:
    """The input of every nn.Linear in the decoder layers on one sequence, by weight name."""
    import torch

    captured, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            hook = module.register_forward_hook(
                lambda _m, args, _out, name=name: captured.__setitem__(f"{name}.weight", args[0][0].float().numpy())
            )
            hooks.append(hook)
    with torch.no_grad():
        model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return captured


def node_figures(checkpoint: Path, gguf: Path) -> list[Figure]:
    """The node-by-node table as one report figure, and the share of the as-stored error the
    recentring removes at blocks of 32 (the default's arithmetic), over all projections."""
    from slmkit.onnx.gguf_carry import GgufWeights

    model, tokenizer = float_reference(checkpoint, gguf)
    ids = scored_sequences(tokenizer, [], WINDOW, 1)[0][0]
    weights = GgufWeights(gguf, json.loads((checkpoint / "config.json").read_text()))
    table = node_errors(projection_inputs(model, ids), weights.block_weights)
    print(json.dumps(table, indent=1))
    stored = statistics.fmean(row["MatMulNBits as stored, int8 per 32"] for row in table.values())
    recentred = statistics.fmean(row["MatMulNBits recentred, int8 per 32"] for row in table.values())
    llama = statistics.fmean(row["llama.cpp (q8 per 32)"] for row in table.values())
    detail = {
        "by_projection": table,
        "mean_as_stored_32": stored,
        "mean_recentred_32": recentred,
        "mean_llama_cpp": llama,
    }
    return [Figure("node output error: recentred / llama.cpp (int8 per 32)", recentred / llama, detail)]
