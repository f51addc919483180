"""Batched decoding of concurrent requests: the batch rules as plain functions, and on the real
tiny Phi-3 int4 model that a batch never changes an answer. Slots are queued before any is read,
so which requests share a batch is decided here, not by thread timing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from slmkit.models.onnx_wrapper import ONNX_ARTIFACT
from slmkit.onnx.batching import (
    BATCH_DEPENDENT,
    INDEPENDENT,
    LONE_ROW_DIFFERS,
    MAX_BATCH_SIZE_ENV,
    MAX_KEPT_PROMPTS,
    PROMPT_CACHE_ENV,
    PROMPT_CACHE_MIB_ENV,
    BatchedDecoder,
    KeptPrompt,
    PromptCache,
    Slot,
    admit,
    batch_behaviour,
    batch_logits,
    max_batch_size,
    prompt_cache_bytes,
    prompt_cache_enabled,
    reusable_prefix,
    right_padded,
    room_for_next_turns,
    worth_rewinding,
)
from slmkit.onnx.greedy import chat_prompt_ids, load
from slmkit.onnx.session import model_tokens


def slot(length: int, max_new_tokens: int = 8, sampling: dict | None = None) -> Slot:
    return Slot(np.arange(1, length + 1, dtype=np.int32), max_new_tokens, sampling)


def test_right_padded_keeps_each_prompt_first_and_pads_after_it():
    batch = right_padded([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert batch.dtype == np.int32
    assert batch.tolist() == [[5, 6, 7], [8, 0, 0]]


def test_a_sampled_request_runs_alone_and_greedy_ones_pass_it():
    sampled = slot(4, sampling={"do_sample": True, "temperature": 1.0})
    greedy = [slot(4), slot(5)]
    assert admit([sampled, *greedy], max_batch_size=4, context_length=64) == [sampled]
    assert admit([greedy[0], sampled, greedy[1]], max_batch_size=4, context_length=64) == greedy


def test_a_batch_holds_at_most_max_batch_size_live_requests_in_arrival_order():
    waiting = [slot(3) for _ in range(6)]
    waiting[1].abandoned = True
    assert admit(waiting, max_batch_size=3, context_length=64) == [waiting[0], *waiting[2:4]]
    assert admit([waiting[1]], max_batch_size=3, context_length=64) == []


def test_a_request_joins_only_if_every_row_keeps_its_budget_within_the_context():
    first, too_long, fits = slot(10, max_new_tokens=20), slot(30, max_new_tokens=20), slot(12, max_new_tokens=4)
    # padded to 30 wide, 30 + 20 > 40; the short one fits beside the first: 12 + 20 <= 40
    assert admit([first, too_long, fits], max_batch_size=4, context_length=40) == [first, fits]
    # alone, a request always runs: its length is capped at the context as without batching
    assert admit([too_long], max_batch_size=4, context_length=40) == [too_long]


def test_max_batch_size_comes_from_the_environment_then_the_logged_config(monkeypatch):
    monkeypatch.delenv(MAX_BATCH_SIZE_ENV, raising=False)
    assert max_batch_size() == 4
    assert max_batch_size(2) == 2
    monkeypatch.setenv(MAX_BATCH_SIZE_ENV, "1")
    assert max_batch_size(2) == 1
    monkeypatch.setenv(MAX_BATCH_SIZE_ENV, "four")
    with pytest.raises(ValueError, match=r"at least 1 .* got 'four'"):
        max_batch_size()


def test_the_prompt_cache_budget_comes_from_the_environment_in_mib(monkeypatch):
    monkeypatch.delenv(PROMPT_CACHE_MIB_ENV, raising=False)
    assert prompt_cache_bytes() == 4096 * 2**20
    monkeypatch.setenv(PROMPT_CACHE_MIB_ENV, "0.5")
    assert prompt_cache_bytes() == 2**19
    for bad in ("-1", "lots", "nan"):
        monkeypatch.setenv(PROMPT_CACHE_MIB_ENV, bad)
        with pytest.raises(ValueError, match=rf"{PROMPT_CACHE_MIB_ENV} must be a number of MiB .* got '{bad}'"):
            prompt_cache_bytes()


def test_a_kept_generator_holds_its_next_turn_and_as_much_again_as_its_request():
    assert room_for_next_turns(wanted=106, max_new_tokens=64) == 64 + 256  # a first turn: the next one
    assert room_for_next_turns(wanted=438, max_new_tokens=64) == 438  # a long one: doubled


def kept(*tokens: int, capacity: int = 100) -> KeptPrompt:
    return KeptPrompt(object(), np.array(tokens), capacity)


def test_the_prompt_cache_gives_the_kept_prompt_a_request_continues_and_keeps_the_others():
    """Two conversations share the chat template's first tokens; each next turn takes its own."""
    first, second = kept(1, 2, 3, 4, 5), kept(1, 2, 9, 9)
    cache = PromptCache(budget_bytes=1000, bytes_per_position=1, entries=[first, second])
    assert cache.take(np.array([1, 2, 3, 4, 5, 6, 7]), wanted=10, new_capacity=100) == (first, 5)
    assert cache.entries == [second]
    assert cache.take(np.array([1, 2, 9, 9, 8, 8]), wanted=10, new_capacity=100) == (second, 4)
    # A repeated prompt continues its own: all but the two tokens every request appends.
    cache.keep(first)
    assert cache.take(np.array([1, 2, 3, 4, 5]), wanted=10, new_capacity=100) == (first, 3)
    # No room for the request in a kept Generator: a new one.
    cache.keep(first)
    assert cache.take(np.array([1, 2, 3, 4, 5, 6, 7]), wanted=101, new_capacity=200) is None


def test_a_new_prompt_gets_a_new_generator_while_one_fits_then_takes_the_least_recent():
    older, newer = kept(1, 2, 3, 4, 5), kept(1, 2, 6, 7)
    prompt = np.array([1, 2, 8, 8, 8])
    roomy = PromptCache(budget_bytes=300, bytes_per_position=1, entries=[older, newer])
    assert roomy.take(prompt, wanted=10, new_capacity=100) is None  # 300 bytes hold a third
    assert roomy.entries == [older, newer]
    full = PromptCache(budget_bytes=200, bytes_per_position=1, entries=[older, newer])
    assert full.take(prompt, wanted=10, new_capacity=100) == (older, 2)  # it would be evicted anyway
    assert full.entries == [newer]
    unrelated = PromptCache(budget_bytes=200, bytes_per_position=1, entries=[older, newer])
    assert unrelated.take(np.array([7, 7, 7, 7]), wanted=10, new_capacity=100) is None


def test_an_edited_last_question_rewinds_its_conversation_rather_than_starting_afresh():
    conversation, other = kept(*range(1, 31)), kept(1, 2, 50, 51)
    cache = PromptCache(budget_bytes=10**6, bytes_per_position=1, entries=[conversation, other])
    edited = np.array([*range(1, 26), 90, 91, 92])  # its first 25 tokens shared, a new ending
    assert cache.take(edited, wanted=40, new_capacity=100) == (conversation, 25)
    # Two questions after the same 24-token chat template share too little to give one up.
    assert not worth_rewinding(24, kept(*range(42)), np.arange(40))
    # Nor does a prompt that shares most of itself with a long conversation it would cut short.
    assert not worth_rewinding(30, kept(*range(100)), np.arange(33))


def test_the_prompt_cache_keeps_the_most_recent_within_its_budget_and_forgets_a_failed_one():
    a, b, c = kept(1, 1, 1), kept(2, 2, 2), kept(3, 3, 3, capacity=500)
    cache = PromptCache(budget_bytes=250, bytes_per_position=1)
    for entry in (a, b):
        cache.keep(entry)
    assert cache.entries == [a, b]
    cache.keep(c)  # larger than the whole budget: kept alone, as the one kept Generator
    assert cache.entries == [c]
    cache.drop(c.generator)
    assert cache.entries == []
    unknown = PromptCache(budget_bytes=10**9, bytes_per_position=0)  # cache size unknown: one
    unknown.keep(a)
    unknown.keep(b)
    assert unknown.entries == [b]
    many = PromptCache(budget_bytes=10**9, bytes_per_position=1)
    prompts = [kept(n, n, n) for n in range(MAX_KEPT_PROMPTS + 2)]
    for entry in prompts:
        assert many.fits(100) == (len(many.entries) < MAX_KEPT_PROMPTS)
        many.keep(entry)
    assert many.entries == prompts[-MAX_KEPT_PROMPTS:]


@pytest.fixture(scope="module")
def onnx_folder(wrapper_dir: Path) -> Path:
    return wrapper_dir / "artifacts" / ONNX_ARTIFACT


@pytest.fixture(scope="module")
def model_and_tokenizer(onnx_folder: Path):
    return load(onnx_folder, threads=2)


@pytest.fixture
def decoder(model_and_tokenizer, onnx_folder: Path) -> BatchedDecoder:
    return BatchedDecoder(model_and_tokenizer[0], model_tokens(onnx_folder), max_batch_size=4)


@pytest.fixture(scope="module")
def ask(model_and_tokenizer):
    """Prompt token ids of user questions under the model's chat template."""
    tokenizer = model_and_tokenizer[1]
    return lambda *questions: [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]


QUESTIONS = [
    "What is the capital of France?",
    "Hi",
    "Name three colours, please, and say which one you like best and why.",
    "What is two plus two?",
    "Tell me a very short story about a cat who sails across the sea.",
    "Why?",
]


def test_requests_queued_together_share_batches_and_get_the_answers_they_get_alone(ask, decoder):
    prompts = ask(*QUESTIONS)
    assert len({len(p) for p in prompts}) > 1  # rows of different lengths, so padding happens
    budgets = [3, 24, 9, 16, 24, 5]
    alone = []
    for prompt, budget in zip(prompts, budgets, strict=True):
        single = Slot(prompt, budget)
        alone.append(list(decoder.generate(single)))
        assert single.batch_size == 1
    slots = [Slot(prompt, budget) for prompt, budget in zip(prompts, budgets, strict=True)]
    streams = [decoder.generate(s) for s in slots]
    together = [list(stream) for stream in reversed(streams)][::-1]  # read in another order than queued
    assert [s.batch_size for s in slots] == [4, 4, 4, 4, 2, 2]
    assert together == alone
    assert all(len(tokens) <= budget for tokens, budget in zip(together, budgets, strict=True))


def test_a_request_queues_while_another_caller_runs_the_model(ask, decoder):
    """A request that arrives while a batch starts is queued at once, not held behind the model's
    run (the batch-size callback runs inside the turn, with the model's run), and is answered."""
    first_prompt, second_prompt = ask("Hi", "Why?")
    alone = list(decoder.generate(Slot(second_prompt, 6)))
    second, streams = Slot(second_prompt, 6), []

    def queue_second(rows: int) -> None:
        if not streams:
            thread = threading.Thread(target=lambda: streams.append(decoder.generate(second)))
            thread.start()
            thread.join(timeout=30)

    decoder.on_batch = queue_second
    first = Slot(first_prompt, 6)
    stream = decoder.generate(first)
    next(stream)
    assert streams, "generate() waited for the running batch"
    list(stream)
    assert list(streams[0]) == alone
    assert (first.batch_size, second.batch_size) == (1, 1)


def test_callers_started_together_in_threads_each_get_their_lone_answer(ask, decoder):
    prompts = ask(*QUESTIONS[:4])
    alone = [list(decoder.generate(Slot(prompt, 10))) for prompt in prompts]
    answers: dict[int, list[int]] = {}
    threads = [
        threading.Thread(
            target=lambda row=row: answers.__setitem__(row, list(decoder.generate(Slot(prompts[row], 10))))
        )
        for row in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [answers.get(row) for row in range(4)] == alone


def test_a_dropped_request_leaves_its_batch_mates_answers_unchanged(ask, decoder):
    prompts = ask(*QUESTIONS[:3])
    alone = [list(decoder.generate(Slot(prompt, 20))) for prompt in prompts]
    slots = [Slot(prompt, 20) for prompt in prompts]
    streams = [decoder.generate(s) for s in slots]
    next(streams[1]), next(streams[1])
    streams[1].close()
    assert slots[1].abandoned
    assert [list(streams[0]), list(streams[2])] == [alone[0], alone[2]]
    assert slots[0].batch_size == 3


def test_a_sampled_request_beside_greedy_ones_runs_alone_and_keeps_its_seed(ask, decoder):
    prompt = ask("Tell me something.")[0]
    sampling = {"do_sample": True, "temperature": 1.5, "random_seed": 7}
    alone = list(decoder.generate(Slot(prompt, 12, dict(sampling))))
    greedy, sampled = Slot(prompt, 12), Slot(prompt, 12, dict(sampling))
    streams = [decoder.generate(greedy), decoder.generate(sampled)]
    assert list(streams[1]) == alone
    list(streams[0])
    assert (greedy.batch_size, sampled.batch_size) == (1, 1)


def test_a_batch_waits_for_the_requests_the_server_holds_but_a_sampled_one_does_not(
    ask, model_and_tokenizer, onnx_folder
):
    """With the server holding more requests than have queued, a greedy request waits up to the
    window for them; a sampled one, which runs alone whatever comes, starts at once."""
    prompt = ask("Hi")[0]
    decoder = BatchedDecoder(model_and_tokenizer[0], model_tokens(onnx_folder), batch_window_s=1.5)
    decoder.requests_in_flight = lambda: 4
    started = time.monotonic()
    list(decoder.generate(Slot(prompt, 2, {"do_sample": True, "random_seed": 1})))
    sampled_s = time.monotonic() - started
    started = time.monotonic()
    list(decoder.generate(Slot(prompt, 2)))
    greedy_s = time.monotonic() - started
    assert sampled_s < 1.0
    assert greedy_s >= 1.5


def test_generation_stops_between_tokens_once_the_deadline_has_passed(ask, decoder):
    prompt = ask("Write a long story.")[0]
    late = Slot(prompt, 400, deadline=time.monotonic() + 60)
    stream = decoder.generate(late)
    next(stream), next(stream)
    late.deadline = time.monotonic() - 1
    assert list(stream) == []
    assert late.timed_out
    assert late.produced == 2
    assert list(decoder.generate(Slot(prompt, 3)))  # its row was dropped: the next request runs


def test_a_failed_batch_raises_in_its_callers_and_the_decoder_serves_on(ask, decoder):
    too_long = Slot(np.ones(600, dtype=np.int32), 4)  # past the tiny model's 512-token context
    with pytest.raises(RuntimeError):
        list(decoder.generate(too_long))
    prompt = ask("Hi")[0]
    assert list(decoder.generate(Slot(prompt, 3)))


def test_reusable_prefix_is_the_shared_prompt_start_leaving_two_tokens_to_append():
    kept = np.array([1, 2, 3, 4, 5])
    assert reusable_prefix(kept, np.array([1, 2, 3, 4, 5, 6, 7, 8])) == 5
    assert reusable_prefix(kept, np.array([1, 2, 9, 4, 5, 6, 7])) == 2
    assert reusable_prefix(kept, np.array([1, 2, 3, 4, 5, 6])) == 4  # two tokens are always appended
    assert reusable_prefix(kept, np.array([7, 2, 3])) == 0


def test_a_conversation_reuses_its_last_prompts_cache_and_gets_the_answers_of_a_fresh_generator(
    model_and_tokenizer, onnx_folder, decoder
):
    """Each turn resends the conversation, as a chat client does; the decoder rewinds the last
    lone request's Generator to the shared prompt, and every answer is the one a decoder with
    nothing kept gives, token for token. A batch of two in between leaves the kept cache alone."""
    model, tokenizer = model_and_tokenizer
    conversation, reused = [], []
    for turn, question in enumerate(["Hi", "What is the capital of France?", "Why?", "Tell me more."]):
        conversation.append({"role": "user", "content": question})
        prompt = chat_prompt_ids(tokenizer, conversation)
        fresh = list(BatchedDecoder(model, model_tokens(onnx_folder)).generate(Slot(prompt, 12)))
        kept = Slot(prompt, 12)
        assert list(decoder.generate(kept)) == fresh
        reused.append(kept.reused_tokens)
        conversation.append({"role": "assistant", "content": tokenizer.decode(fresh)})
        if turn == 1:
            pair = [Slot(p, 4) for p in (prompt, prompt)]
            assert [len(list(s)) for s in [decoder.generate(slot) for slot in pair]] == [4, 4]
    assert reused[0] == 0
    assert all(count > 0 for count in reused[1:]), reused


@pytest.mark.parametrize("budget_bytes", [1024 * 2**20, 0])
def test_clients_taking_turns_each_reuse_their_own_prompt_within_the_budget(
    budget_bytes, ask, model_and_tokenizer, onnx_folder
):
    """Two clients alternate, each repeating its question. With room for both Generators, each
    request after the first two reuses all of its prompt but the two tokens it appends; with no
    room, only the last one is kept and they share the chat template's start. Every answer is the
    one a decoder with nothing kept gives."""
    model, tokens = model_and_tokenizer[0], model_tokens(onnx_folder)
    prompts = ask(QUESTIONS[0], QUESTIONS[3])
    fresh = [list(BatchedDecoder(model, tokens, behaviour=INDEPENDENT).generate(Slot(p, 8))) for p in prompts]
    decoder = BatchedDecoder(model, tokens, behaviour=INDEPENDENT, prompt_cache_bytes=budget_bytes)
    slots = [Slot(prompts[turn % 2], 8) for turn in range(4)]
    assert [list(decoder.generate(slot)) for slot in slots] == fresh * 2
    shared = reusable_prefix(prompts[0], prompts[1])
    assert 0 < shared < len(prompts[0]) - 2
    reused = [slot.reused_tokens for slot in slots]
    if budget_bytes:
        assert reused == [0, 0, len(prompts[0]) - 2, len(prompts[1]) - 2]
    else:
        assert reused == [0, shared, shared, shared]


def test_the_prompt_cache_can_be_turned_off_where_the_model_is_served(model_and_tokenizer, onnx_folder, monkeypatch):
    """evaluate's measuring process turns it off (SLMKIT_PROMPT_CACHE=0): its time to first token
    is a one-token request of the same prompt, which would leave the full request's prompt cached."""
    model, tokenizer = model_and_tokenizer
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": "What is two plus two?"}])
    decoder = BatchedDecoder(model, model_tokens(onnx_folder), reuse_prompts=False)
    first, second = Slot(prompt, 1), Slot(prompt, 6)
    list(decoder.generate(first))
    list(decoder.generate(second))
    assert second.reused_tokens == 0
    monkeypatch.setenv(PROMPT_CACHE_ENV, "0")
    assert not prompt_cache_enabled()
    monkeypatch.delenv(PROMPT_CACHE_ENV)
    assert prompt_cache_enabled()


def test_batch_behaviour_compares_a_rows_logits_alone_and_in_batches_bit_for_bit():
    same = np.array([1.0, 2.0], dtype=np.float32)
    one_ulp = np.nextafter(same, np.float32(3))
    assert batch_behaviour({1: same, 2: same, 4: same}) == INDEPENDENT
    assert batch_behaviour({1: one_ulp, 2: same, 4: same}) == LONE_ROW_DIFFERS
    assert batch_behaviour({1: same, 2: same, 4: one_ulp}) == BATCH_DEPENDENT


def test_the_decoder_measures_how_a_models_rows_behave_in_batches(model_and_tokenizer, onnx_folder):
    model, tokens = model_and_tokenizer[0], model_tokens(onnx_folder)
    logits = batch_logits(model, tokens, [1, 2, 4])
    assert {size: values.shape for size, values in logits.items()} == {size: logits[1].shape for size in (1, 2, 4)}
    assert np.isfinite(logits[1]).all()
    decoder = BatchedDecoder(model, tokens, max_batch_size=4)
    assert decoder.behaviour == batch_behaviour(logits)
    assert decoder.max_batch_size == (1 if decoder.behaviour == BATCH_DEPENDENT else 4)
    assert BatchedDecoder(model, tokens, max_batch_size=1).behaviour == INDEPENDENT  # nothing to measure


@pytest.mark.parametrize("behaviour", [LONE_ROW_DIFFERS, BATCH_DEPENDENT])
def test_where_rows_change_with_the_batch_every_answer_is_still_the_lone_one(
    behaviour, ask, model_and_tokenizer, onnx_folder
):
    """As on an AVX2 machine at blocks of 32: a lone greedy row runs beside a copy of itself (and
    so keeps no prompt cache), or, where batches of different sizes differ, batching is off (and
    every row is lone, with its cache)."""
    model, tokens = model_and_tokenizer[0], model_tokens(onnx_folder)
    prompts = ask(*QUESTIONS[:4])
    alone = [list(BatchedDecoder(model, tokens, behaviour=INDEPENDENT).generate(Slot(p, 12))) for p in prompts]
    decoder = BatchedDecoder(model, tokens, behaviour=behaviour)
    lone = [Slot(p, 12) for p in [*prompts, prompts[0]]]
    assert [list(decoder.generate(slot)) for slot in lone] == [*alone, alone[0]]
    assert (lone[-1].reused_tokens > 0) == (behaviour == BATCH_DEPENDENT)  # a copy beside it takes no cache
    slots = [Slot(p, 12) for p in prompts]
    assert [list(stream) for stream in [decoder.generate(slot) for slot in slots]] == alone
    assert [slot.batch_size for slot in slots] == ([4] * 4 if behaviour == LONE_ROW_DIFFERS else [1] * 4)


def test_a_repeated_prompt_reuses_its_cache_where_rows_are_independent(ask, model_and_tokenizer, onnx_folder):
    """The counterpart of the test above: the lone path's prompt cache is on by default."""
    decoder = BatchedDecoder(model_and_tokenizer[0], model_tokens(onnx_folder), behaviour=INDEPENDENT)
    prompt = ask(QUESTIONS[2])[0]
    first, again = Slot(prompt, 6), Slot(prompt, 6)
    assert list(decoder.generate(first)) == list(decoder.generate(again))
    assert again.reused_tokens == len(prompt) - 2
