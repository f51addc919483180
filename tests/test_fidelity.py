"""Fidelity measured as llama-perplexity --kl-divergence measures it: the pure parts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slmkit.evaluation.fidelity import WINDOW, compare_positions, fidelity, scored_rows, text_sequences


def test_identical_logits_agree_everywhere_with_zero_divergence():
    logits = np.random.default_rng(0).normal(size=(5, 11))
    same, kl = compare_positions(logits, logits.copy())
    assert same.all()
    assert np.allclose(kl, 0.0)


def test_divergence_is_the_kl_of_the_reference_from_the_candidate():
    reference = np.log(np.array([[0.5, 0.25, 0.25]]))
    candidate = np.log(np.array([[0.25, 0.5, 0.25]]))
    same, kl = compare_positions(reference, candidate)
    assert not same[0]
    assert math.isclose(kl[0], 0.5 * math.log(2) + 0.25 * math.log(0.5), rel_tol=1e-9)


def test_text_is_read_in_whole_windows_scored_after_their_context():
    windows = text_sequences(list(range(2 * WINDOW + 7)))
    assert [len(ids) for ids, _ in windows] == [WINDOW, WINDOW]
    assert windows[1][0][0] == WINDOW
    assert all(first == 32 for _, first in windows)


def test_positions_predict_the_next_token_and_are_counted_once():
    """Logits at position i predict token i+1: a sequence of 6 tokens scored from 2 has 4 positions."""
    vocabulary = 8

    def one_hot_of_next(ids: list[int]) -> np.ndarray:
        rows = np.full((len(ids), vocabulary), -10.0)
        for position in range(len(ids) - 1):
            rows[position, ids[position + 1]] = 10.0
        return rows

    def always_zero(ids: list[int]) -> np.ndarray:
        rows = np.full((len(ids), vocabulary), -10.0)
        rows[:, 0] = 10.0
        return rows

    ids = [1, 2, 0, 3, 0, 5]
    scored = fidelity([(ids, 2)], scored_rows([(ids, 2)], one_hot_of_next), always_zero)
    assert scored.positions == 4
    assert scored.top1_agreement == 0.5  # tokens 0, 3, 0, 5 follow: the candidate gets the two zeros
    assert scored.kl_divergence > 1


def test_the_benchs_bucketed_kld_bounds_the_full_one_from_below_and_is_zero_for_the_same_model():
    """bench/fidelity.py compares llama-server by its top log-probabilities only: the KLD over the
    reference's top tokens and one bucket for the rest never exceeds the full KLD."""
    from bench.fidelity import bucketed_kld, top_logprobs
    from slmkit.evaluation.fidelity import log_softmax

    rng = np.random.default_rng(0)
    reference, candidate = rng.normal(size=(2, 500)) * 3
    log_p, log_q = log_softmax(reference[None])[0], log_softmax(candidate[None])[0]
    full = float((np.exp(log_p) * (log_p - log_q)).sum())
    assert bucketed_kld(log_p, top_logprobs(reference[None])[0]) == pytest.approx(0.0, abs=1e-9)
    assert 0 < bucketed_kld(log_p, top_logprobs(candidate[None])[0]) <= full
