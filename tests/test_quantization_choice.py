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


def test_the_first_candidate_that_keeps_the_float_models_top_token_is_kept_and_nothing_larger_is_built():
    """By fidelity, not by answers: int4 answers as many rows correctly as int8 but keeps fewer
    of the float model's next-token choices."""
    results = {
        "int4": Candidate("int4", 10, top1_agreement=0.6, correct_rate=0.85),
        "int8": Candidate("int8", 20, top1_agreement=0.97, correct_rate=0.85),
        "fp32": Candidate("fp32", 40, top1_agreement=1.0, correct_rate=0.85),
    }
    measure, tried = measured(results)
    kept, candidates = choose(["int4", "int8", "fp32"], measure, min_top1_agreement=0.9)
    assert kept == results["int8"]
    assert tried == ["int4", "int8"]
    assert candidates == [results["int4"], results["int8"]]


def test_a_skipped_candidate_never_counts_and_without_a_faithful_one_the_most_faithful_is_kept():
    results = {
        "gguf": Candidate("gguf", skipped="the model fails to load"),
        "int4": Candidate("int4", 10, top1_agreement=0.4, correct_rate=0.9),
        "int8": Candidate("int8", 20, top1_agreement=0.6, correct_rate=0.5),
    }
    measure, _ = measured(results)
    kept, candidates = choose(["gguf", "int4", "int8"], measure, min_top1_agreement=0.9)
    assert kept == results["int8"]
    assert [c.quantization for c in candidates] == ["gguf", "int4", "int8"]
    measure, _ = measured({"gguf": results["gguf"]})
    assert choose(["gguf"], measure, 0.0) == (None, [results["gguf"]])
