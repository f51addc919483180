"""Concurrent greedy requests decoded as rows of one onnxruntime-genai Generator.

Why: onnxruntime-genai's Python calls hold the GIL and its objects are not thread-safe, so
requests sharing one model run one after another. On CPU a decode step for four rows costs far
less than four steps for one (SmolLM2-135M int4 on 2 CPUs: 10 ms against 4 × 3.9 ms), so
requests that wait together are run together.

Why the answers stay exact: prompts are padded on the right with the model's pad token.
onnxruntime-genai finds each row's last prompt token by scanning back over pad tokens
(`src/models/logits.cpp`) and its GroupQueryAttention op takes a right-padding mask; left
padding changes greedy answers (measured in `bench/batching.py`). Only greedy requests share a
batch: sampling options belong to a whole Generator, so a sampled request runs alone.

The batches are static: a Generator cannot take a row once it has started, so a request that
arrives while a batch runs waits for the next batch. There is no scheduler thread: a waiting
caller takes the turn and advances the current batch by one token for everyone, or forms the next
batch when none runs, while the others wait for their tokens; a lone request therefore decodes at
the bare loop's speed. The queue's lock is released while onnxruntime-genai runs, so a request
queues at once, and counts toward the next batch's size, while a batch runs.

A chat client sends the whole conversation again every turn. A lone greedy request's Generator is
kept when it ends, sized for its next turn (`room_for_next_turns`), and a later lone greedy request
that continues (or repeats) its prompt rewinds it (`rewind_to`) to the prompt they share and
appends only the rest, as llama-server's `cache_prompt` does. Several are kept, one per
conversation, up to a memory budget (`PromptCache`), as llama-server's host-memory prompt cache
(`--cache-ram`) keeps the prompts of its slots. Only prompt tokens are reused, never generated
ones, and at least two tokens are appended: a position's keys and values computed one token at a
time (the decode path) differ in the last bits from a prefill's and would change greedy answers,
while a prefill chunk computes each row as the whole prompt's prefill does, so the answers stay
exactly those of a fresh Generator (`tests/test_onnx_batching.py`). Models with sliding-window
layers never reuse: their cache wraps around.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slmkit.onnx.session import ModelTokens

MAX_BATCH_SIZE_ENV = "SLMKIT_MAX_BATCH_SIZE"
DEFAULT_MAX_BATCH_SIZE = 4
# "0" or "false" turns the reuse of a conversation's prompt cache off where the model is served;
# the evaluate step's measuring process does, so that each row's timings are its own.
PROMPT_CACHE_ENV = "SLMKIT_PROMPT_CACHE"
# How much memory the kept Generators' caches may take where the model is served, in MiB (the most
# recent one is kept whatever its size).
PROMPT_CACHE_MIB_ENV = "SLMKIT_PROMPT_CACHE_MIB"
DEFAULT_PROMPT_CACHE_MIB = 4096
# And at most this many: the conversations of a few clients taking turns. Each request compares its
# prompt with every kept one, and a Generator holds more than its cache (its logits, its inputs).
MAX_KEPT_PROMPTS = 8
# A lone greedy Generator holds room for its request, its answer again and this many tokens more:
# the next turn of a conversation (this answer and a new question) then fits and reuses its cache.
NEXT_QUESTION_TOKENS = 256


def room_for_next_turns(wanted: int, max_new_tokens: int) -> int:
    """Positions a new lone greedy Generator holds beyond the `wanted` of its request: the next
    turn's (its answer again and a question), and at least as many as it holds already.

    Why the second: a Generator's length is fixed when it is made, and a conversation whose next
    turn no longer fits starts afresh, its whole prompt computed again. Room for one more turn
    only did that every third or fourth turn (SmolLM2, 64-token answers: at 374 prompt tokens,
    0.36 s to the first token against 0.08 s reused); doubling the length each time makes it a
    few times in a conversation's life, at the price of memory held (`PromptCache`'s budget).
    """
    return max(max_new_tokens + NEXT_QUESTION_TOKENS, wanted)


def switched_off(value: str) -> bool:
    """Whether a setting's value turns its feature off: 0, false, no or off, in any case."""
    return value.strip().lower() in {"0", "false", "no", "off"}


def prompt_cache_enabled() -> bool:
    """Whether lone greedy requests reuse kept prompts' caches (SLMKIT_PROMPT_CACHE, default on)."""
    return not switched_off(os.environ.get(PROMPT_CACHE_ENV, "1"))


def prompt_cache_bytes() -> int:
    """The kept Generators' memory budget: SLMKIT_PROMPT_CACHE_MIB, else 4096 MiB.

    Raises:
        ValueError: the value is not a number of at least 0.
    """
    raw = os.environ.get(PROMPT_CACHE_MIB_ENV) or str(DEFAULT_PROMPT_CACHE_MIB)
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if not mib >= 0:
        raise ValueError(f"{PROMPT_CACHE_MIB_ENV} must be a number of MiB of at least 0, got {raw!r}")
    return int(mib * 2**20)


def max_batch_size(configured: int | None = None) -> int:
    """Rows per batch: SLMKIT_MAX_BATCH_SIZE, else the logged `configured`, else 4.

    The variable changes it where the model is served, without logging the model again; 1
    turns batching off.

    Raises:
        ValueError: the value is not a whole number of at least 1.
    """
    raw = os.environ.get(MAX_BATCH_SIZE_ENV) or (DEFAULT_MAX_BATCH_SIZE if configured is None else configured)
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"max batch size must be a whole number of at least 1 (1 turns batching off), got {raw!r}")
    return size


# How a model's rows behave in batches on this machine (`batch_behaviour`):
INDEPENDENT = "independent"  # a row's logits are the same alone and in any batch
LONE_ROW_DIFFERS = "lone-row-differs"  # the same in every batch of 2 or more, not alone: lone rows run as 2
BATCH_DEPENDENT = "batch-dependent"  # rows change with the batch's size: batching is off
BEHAVIOURS = frozenset({INDEPENDENT, LONE_ROW_DIFFERS, BATCH_DEPENDENT})


def batch_logits(model: Any, tokens: ModelTokens, sizes: Sequence[int]) -> dict[int, np.ndarray]:
    """The first row's logits for a one-token prompt, run in a batch of each size whose rows are
    all that token: one row through the model per row of the batch, as a decode step runs
    (sizes 1 to 4: 0.08 s on SmolLM2, 0.37 s at Phi-3-mini's size)."""
    import onnxruntime_genai as og

    logits = {}
    for size in sizes:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=tokens.max_length(2), batch_size=size, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.ones((size, 1), dtype=np.int32))
        logits[size] = np.asarray(generator.get_logits())[0].ravel()
    return logits


def behaviour_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes `batch_behaviour` is measured on: every size up to 4, and the largest."""
    return sorted({*range(1, min(max_batch_size, 4) + 1), max_batch_size})


def batch_behaviour(logits: dict[int, np.ndarray]) -> str:
    """INDEPENDENT, LONE_ROW_DIFFERS or BATCH_DEPENDENT, from `batch_logits` of sizes 1, 2 and
    more (the decoder measures every size up to 4, and its largest), compared bit for bit.

    Why it is measured, not assumed: onnxruntime's MLAS decodes one row of a 4-bit MatMulNBits
    with blocks of 32 or more on its own kernel on AVX2 (`BlkLen >= 32 && CountM == 1`), and
    every batch on its tile kernel; the two sum in different orders, which changed greedy answers
    (0 of 8 equal on SmolLM2). AVX-512 machines, and blocks of 16, take the tile kernel for every
    row count. Running a lone greedy row beside a copy of itself keeps it on the tile kernel.
    Float32 activations (accuracy level 1) also differ for the lone row only (SmolLM2, 2026-12-05).
    """
    lone, *batched = (logits[size] for size in sorted(logits))
    if any(not np.array_equal(batched[0], other) for other in batched[1:]):
        return BATCH_DEPENDENT
    return INDEPENDENT if not batched or np.array_equal(lone, batched[0]) else LONE_ROW_DIFFERS


@dataclass(eq=False)
class Slot:
    """One request: its prompt, its budget, and what was produced for it so far.

    The caller makes it and reads `batch_size` and `timed_out` from it; the decoder fills the rest.
    """

    prompt: np.ndarray
    max_new_tokens: int
    sampling: dict[str, Any] | None = None  # None: greedy, so it may share a batch
    deadline: float | None = None  # time.monotonic() past which the request is given up
    tokens: deque[int] = field(default_factory=deque)
    produced: int = 0
    batch_size: int = 0  # rows in the batch it ran in; 0 until it is admitted
    finished: bool = False
    timed_out: bool = False
    abandoned: bool = False  # its caller stopped reading: the row is no longer worth decoding
    error: BaseException | None = None
    reused_tokens: int = 0  # prompt tokens whose KV cache came from the previous lone request


@dataclass(frozen=True)
class KeptPrompt:
    """The Generator of a lone greedy request, whose prompt's KV cache a later request may reuse."""

    generator: Any
    prompt: np.ndarray
    capacity: int  # the Generator's max_length


def worth_rewinding(reused: int, kept: KeptPrompt, prompt: np.ndarray) -> bool:
    """Whether a kept Generator that `prompt` does not continue is worth rewinding to the `reused`
    tokens they share: two thirds of `prompt` or more, and no fewer than the kept prompt loses."""
    return 3 * reused >= 2 * len(prompt) and reused >= len(kept.prompt) - reused


@dataclass
class PromptCache:
    """Kept Generators, least recently used first, at most MAX_KEPT_PROMPTS within `budget_bytes`
    of caches (the most recent one whatever its size; only it where `bytes_per_position` is 0,
    unknown).

    Why several: clients who take turns, or who repeat a prompt, would otherwise each rewind the
    one kept Generator to the few tokens their prompts share (the chat template's) and compute the
    rest again; kept apart, each next turn appends only its new tokens.
    """

    budget_bytes: int
    bytes_per_position: int
    entries: list[KeptPrompt] = field(default_factory=list)

    def take(self, prompt: np.ndarray, wanted: int, new_capacity: int) -> tuple[KeptPrompt, int] | None:
        """The kept Generator that is to hold `prompt` (`wanted` positions in all) and how many of
        its tokens it keeps, taken out of the cache; None where a new Generator of `new_capacity`
        is to be made. In order:

        1. one whose prompt `prompt` continues or repeats: its cache loses nothing it could give;
        2. the one sharing the longest prefix, where that is two thirds of `prompt` or more and
           no shorter than what the kept prompt would lose (a conversation whose last question
           was edited, say; not two short questions after the same chat template);
        3. none while a new one fits the budget: the kept ones stay for their own conversations
           (two clients' conversations share only the chat template's first tokens);
        4. the least recently used, which a new one would evict, for the prefix it shares.
        """
        shared = [(reusable_prefix(entry.prompt, prompt), entry) for entry in self.entries if wanted <= entry.capacity]
        continued = [(reused, entry) for reused, entry in shared if reused == min(len(entry.prompt), len(prompt) - 2)]
        longest = max(shared, key=lambda pair: pair[0], default=(0, None))
        if continued:
            reused, entry = max(continued, key=lambda pair: pair[0])
        elif longest[1] is not None and worth_rewinding(*longest, prompt):
            reused, entry = longest
        elif not self.entries or self.fits(new_capacity) or wanted > self.entries[0].capacity:
            return None
        else:
            reused, entry = shared[0]  # the least recently used, which has room: first in `shared`
        if not reused:
            return None
        self.entries.remove(entry)
        return entry, reused

    def fits(self, capacity: int) -> bool:
        """Whether a Generator of `capacity` positions can be kept beside every kept one."""
        return self._within_budget([*(entry.capacity for entry in self.entries), capacity])

    def keep(self, entry: KeptPrompt) -> None:
        """Keep `entry` as the most recent, dropping the least recent ones it leaves no room for."""
        self.entries.append(entry)
        while len(self.entries) > 1 and not self._within_budget([kept.capacity for kept in self.entries]):
            self.entries.pop(0)

    def _within_budget(self, capacities: list[int]) -> bool:
        """Whether Generators of these capacities may all be kept."""
        if not self.bytes_per_position:
            return len(capacities) <= 1
        held = sum(capacities) * self.bytes_per_position
        return len(capacities) <= MAX_KEPT_PROMPTS and held <= self.budget_bytes

    def drop(self, generator: Any) -> None:
        """Forget `generator`, whose cache may hold half a step."""
        self.entries = [entry for entry in self.entries if entry.generator is not generator]


def reusable_prefix(kept: np.ndarray, prompt: np.ndarray) -> int:
    """How many leading tokens of `prompt` can take the kept prompt's cache: their common prefix,
    leaving at least two tokens to append (one would take the decode path; see the module)."""
    limit = min(len(kept), len(prompt) - 2)
    if limit <= 0:
        return 0
    same = kept[:limit] == prompt[:limit]
    return limit if same.all() else int(np.argmin(same))


def right_padded(prompts: Sequence[np.ndarray], pad_id: int) -> np.ndarray:
    """Prompts as one int32 array, each row padded on the right with `pad_id` to the longest."""
    width = max(len(prompt) for prompt in prompts)
    batch = np.full((len(prompts), width), pad_id, dtype=np.int32)
    for row, prompt in enumerate(prompts):
        batch[row, : len(prompt)] = prompt
    return batch


def admit(waiting: Sequence[Slot], max_batch_size: int, context_length: int) -> list[Slot]:
    """The slots of the next batch, first come first served.

    A sampled request runs alone. Greedy requests join while the batch's rows all keep their
    whole budget: every row shares the Generator's length, the padded width plus the largest
    budget, which must fit the context. The first request always runs, its length capped at
    the context as it would be alone.
    """
    live = [slot for slot in waiting if not slot.abandoned]
    if not live:
        return []
    first = live[0]
    if first.sampling is not None:
        return [first]
    batch = [first]
    for slot in live[1:]:
        if len(batch) == max_batch_size:
            break
        if slot.sampling is not None:
            continue
        rows = [*batch, slot]
        width = max(len(row.prompt) for row in rows)
        if width + max(row.max_new_tokens for row in rows) <= context_length:
            batch.append(slot)
    return batch


class BatchedDecoder:
    """Greedy tokens for concurrent requests on one model, in shared batches."""

    def __init__(
        self,
        model: Any,
        tokens: ModelTokens,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_window_s: float = 0.02,
        reuse_prompts: bool = True,
        behaviour: str | None = None,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_MIB * 2**20,
    ) -> None:
        """`batch_window_s`: how long a new batch waits to hold every request seen in flight
        while the last batch ran, so that clients who got their answers together and ask again
        join together; a lone client never waits. `reuse_prompts`: keep lone greedy requests'
        Generators for later requests' shared prompts (see the module), within
        `prompt_cache_bytes`. `behaviour`: how rows behave in batches here (see
        `batch_behaviour`); None measures it on the model."""
        self._model = model
        self._model_tokens = tokens
        if behaviour is None and max_batch_size > 1:
            behaviour = batch_behaviour(batch_logits(model, tokens, behaviour_sizes(max_batch_size)))
        self.behaviour = behaviour or INDEPENDENT
        self._max_batch_size = 1 if self.behaviour == BATCH_DEPENDENT else max_batch_size
        self._batch_window_s = batch_window_s
        # Guards the queue, the batch and every slot. Released while onnxruntime-genai runs and
        # while a batch waits for company, so that requests queue and callers leave meanwhile.
        self._lock = threading.Condition()
        self._waiting: list[Slot] = []
        self._generator: Any = None
        self._rows: list[Slot] = []
        self._in_flight = 1  # most requests waiting or running at once since the last batch began
        self._turn_taken = False  # a caller is running the model for everyone
        self._prompt_cache = PromptCache(prompt_cache_bytes, tokens.kv_bytes_per_position)
        self._reuse_prompts = reuse_prompts
        # Told the row count of each batch as it starts (the serving front's batch-size metric).
        self.on_batch: Callable[[int], None] | None = None
        # Asked, where a server sets it, how many requests it holds, some not queued here yet.
        self.requests_in_flight: Callable[[], int] | None = None
        self._announced = 0  # requests callers said are coming together (`expecting`)

    @property
    def max_batch_size(self) -> int:
        """Rows per batch."""
        return self._max_batch_size

    @property
    def reuse_prompts(self) -> bool:
        """Whether lone greedy requests keep their Generators for later prompts (see the module)."""
        return self._reuse_prompts

    @reuse_prompts.setter
    def reuse_prompts(self, enabled: bool) -> None:
        with self._lock:
            self._reuse_prompts = enabled
            if not enabled:
                self._prompt_cache.entries.clear()

    @property
    def kept_prompts(self) -> int:
        """How many Generators are kept for later prompts."""
        return len(self._prompt_cache.entries)

    @contextlib.contextmanager
    def expecting(self, requests: int) -> Iterator[None]:
        """While inside, a new batch waits (up to its window) for `requests` queued requests:
        a caller that queues several from its own threads (a list given to `predict`) gets them
        batched from the first, as a server's count does for its clients."""
        with self._lock:
            self._announced += requests
        try:
            yield
        finally:
            with self._lock:
                self._announced -= requests

    def generate(self, slot: Slot) -> Iterator[int]:
        """Queue the slot now; the iterator yields its tokens as they come, up to its budget or
        its end-of-text token (yielded last).

        The iterator stops early, setting `timed_out`, once the slot's deadline has passed.
        Closing it early drops the slot's row; a caller must read or close what it queued.

        Raises:
            RuntimeError: onnxruntime-genai failed on the slot's batch (raised while reading).
        """
        with self._lock:
            self._waiting.append(slot)
            running = sum(not row.finished for row in self._rows)
            self._in_flight = max(self._in_flight, running + len(self._waiting))
            self._lock.notify_all()
        return self._stream(slot)

    def _stream(self, slot: Slot) -> Iterator[int]:
        try:
            while True:
                with self._lock:
                    while not slot.tokens and not slot.finished:
                        if slot.deadline is not None and time.monotonic() > slot.deadline:
                            slot.timed_out = True
                            return
                        if self._turn_taken:  # another caller is running the model for everyone
                            self._lock.wait(None if slot.deadline is None else slot.deadline - time.monotonic())
                        else:
                            self._take_turn()
                    tokens, finished, error = list(slot.tokens), slot.finished, slot.error
                    slot.tokens.clear()
                yield from tokens
                if error is not None:
                    raise error
                if finished:
                    return
        finally:
            with self._lock:
                slot.abandoned = True
                self._lock.notify_all()

    def _take_turn(self) -> None:
        """Advance the current batch by one token for every row, or start the next batch (lock
        held; released while onnxruntime-genai runs, so that other callers can queue meanwhile)."""
        self._turn_taken = True
        try:
            if self._generator is not None and all(slot.finished or slot.abandoned for slot in self._rows):
                self._end_batch(None)  # every caller left, e.g. past its deadline: nothing to decode for
            if self._generator is None:
                self._start_batch()
            else:
                self._step()
        finally:
            self._turn_taken = False
            self._lock.notify_all()

    @contextlib.contextmanager
    def _unlocked(self) -> Iterator[None]:
        """The lock released while onnxruntime-genai runs: only the caller whose turn it is
        touches the Generator, and the others may queue, leave or take their tokens meanwhile."""
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()

    def _step(self) -> None:
        try:
            with self._unlocked():
                self._generator.generate_next_token()
                next_tokens = self._generator.get_next_tokens()
        except Exception as error:  # onnxruntime-genai's failure, handed to every caller of the batch
            self._end_batch(error)
            return
        for slot, token in zip(self._rows, next_tokens[: len(self._rows)], strict=True):
            if slot.finished:
                continue
            slot.tokens.append(int(token))
            slot.produced += 1
            if int(token) in self._model_tokens.eos_ids or slot.produced >= slot.max_new_tokens:
                slot.finished = True
        if self._generator.is_done() or all(slot.finished or slot.abandoned for slot in self._rows):
            self._end_batch(None)

    def _start_batch(self) -> None:
        self._wait_for_company()
        rows = admit(self._waiting, self._max_batch_size, self._model_tokens.context_length)
        self._waiting = [slot for slot in self._waiting if slot not in rows and not slot.abandoned]
        self._in_flight = len(rows) + len(self._waiting)
        if not rows:
            return
        width = max(len(slot.prompt) for slot in rows)
        wanted = width + max(slot.max_new_tokens for slot in rows)
        lone_greedy = len(rows) == 1 and rows[0].sampling is None
        # A copy beside a lone greedy row keeps it on the batches' kernel where that differs (see
        # batch_behaviour). Otherwise, on a model without sliding windows, it may take, and leave,
        # a kept cache.
        copied = lone_greedy and self.behaviour == LONE_ROW_DIFFERS
        reusable = self._reuse_prompts and lone_greedy and not copied and not self._model_tokens.min_cache_length
        for slot in rows:
            slot.batch_size = len(rows)
        self._rows = rows
        try:
            with self._unlocked():
                if self.on_batch is not None:
                    self.on_batch(len(rows))
                self._generator = self._generator_for(rows, wanted, reusable, copied)
        except Exception as error:  # onnxruntime-genai's failure, handed to every caller of the batch
            self._end_batch(error)

    def _generator_for(self, rows: list[Slot], wanted: int, reusable: bool, copied: bool) -> Any:
        """A Generator holding the rows' prompts (with `copied`, the lone row's twice): the kept
        one rewound, or a new one."""
        import onnxruntime_genai as og

        room = room_for_next_turns(wanted, rows[0].max_new_tokens) if reusable else 0
        max_length = self._model_tokens.max_length(wanted + room)
        if reusable and (taken := self._prompt_cache.take(rows[0].prompt, wanted, max_length)) is not None:
            return self._reuse(rows[0], *taken)
        prompts = [slot.prompt for slot in rows] * (2 if copied else 1)
        options: dict[str, Any] = {
            "max_length": max_length,
            "batch_size": len(prompts),
            **(rows[0].sampling or {"do_sample": False}),
        }
        params = og.GeneratorParams(self._model)
        params.set_search_options(**options)
        generator = og.Generator(self._model, params)
        generator.append_tokens(right_padded(prompts, self._model_tokens.pad_id))
        if reusable:
            self._prompt_cache.keep(KeptPrompt(generator, rows[0].prompt, max_length))
        return generator

    def _reuse(self, slot: Slot, kept: KeptPrompt, reused: int) -> Any:
        """`kept`'s Generator, taken out of the cache, holding `slot`'s prompt: rewound to the
        `reused` tokens they share, the rest appended; kept again for the next request."""
        kept.generator.rewind_to(reused)
        kept.generator.append_tokens(slot.prompt[reused:].astype(np.int32).reshape(1, -1))
        self._prompt_cache.keep(KeptPrompt(kept.generator, slot.prompt, kept.capacity))
        slot.reused_tokens = reused
        return kept.generator

    def _wait_for_company(self) -> None:
        """Wait up to the window for as many requests as were in flight, or as the server holds
        (lock held, released while waiting).

        Why the server's count: clients that send together reach the model a few milliseconds
        apart (parsing, templating), and the first would otherwise start a batch of its own
        before the others queue, leaving them to wait for its whole answer.
        """
        deadline = time.monotonic() + self._batch_window_s
        while True:
            live = [slot for slot in self._waiting if not slot.abandoned]
            if not live or live[0].sampling is not None or len(live) >= self._expected_rows():
                break  # a sampled request first in line runs alone: company would not join it
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._lock.wait(remaining)

    def _expected_rows(self) -> int:
        """Rows the next batch waits for: requests in flight here or in the server, at most a batch."""
        server = 0 if self.requests_in_flight is None else self.requests_in_flight()
        return min(max(self._in_flight, server, self._announced), self._max_batch_size)

    def _end_batch(self, error: BaseException | None) -> None:
        if error is not None:
            self._prompt_cache.drop(self._generator)
        for slot in self._rows:
            slot.error = slot.error or error
            slot.finished = True
        self._rows, self._generator = [], None
