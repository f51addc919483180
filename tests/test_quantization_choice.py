"""The `quantization=auto` rules, as pure functions: the order candidates are tried in and which one is kept."""

from slmkit.evaluation.quantization_choice import Candidate, candidate_order, choose


def test_candidates_are_tried_smallest_first_with_the_gguf_build_by_its_files_size():
    assert candidate_order("cpu", 5.5) == ["int4", "gguf", "int4-kquant", "int8", "fp32"]
    assert candidate_order("cpu", 8.5) == ["int4", "int4-kquant", "gguf", "int8", "fp32"]
    assert candidate_order("cpu", None) == ["int4", "int4-kquant", "int8", "fp32"]
    assert candidate_order("cuda", 5.5) == ["int4", "int4-kquant", "int8", "fp16", "bf16", "fp32"]  # gguf is cpu only


def measured(results: dict[str, Candidate]):
    tried = []

    def measure(quantization: str) -> Candidate:
        tried.append(quantization)
        return results[quantization]

    return measure, tried


def test_the_first_candidate_within_the_drop_is_kept_and_nothing_larger_is_built():
    results = {
        "int4": Candidate("int4", 10, correct_rate=0.5),
        "int8": Candidate("int8", 20, correct_rate=0.80),
        "fp32": Candidate("fp32", 40, correct_rate=0.85),
    }
    measure, tried = measured(results)
    kept, candidates = choose(["int4", "int8", "fp32"], measure, reference_correct_rate=0.83, max_quality_drop=0.05)
    assert kept == results["int8"]
    assert tried == ["int4", "int8"]
    assert candidates == [results["int4"], results["int8"]]


def test_a_skipped_candidate_never_counts_and_without_a_close_one_the_best_is_kept():
    results = {
        "gguf": Candidate("gguf", skipped="the model fails to load"),
        "int4": Candidate("int4", 10, correct_rate=0.4),
        "int8": Candidate("int8", 20, correct_rate=0.6),
    }
    measure, _ = measured(results)
    kept, candidates = choose(["gguf", "int4", "int8"], measure, reference_correct_rate=0.9, max_quality_drop=0.05)
    assert kept == results["int8"]
    assert [c.quantization for c in candidates] == ["gguf", "int4", "int8"]
    measure, _ = measured({"gguf": results["gguf"]})
    assert choose(["gguf"], measure, 0.0, 0.05) == (None, [results["gguf"]])
