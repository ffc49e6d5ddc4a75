"""One model, one worker thread, a queue of prepared prompts: the part of the API server that runs the model.

HTTP handlers never touch the model. They turn a request into a `Job` (a one-prompt processor output and its
generation settings) and `submit` it; the worker thread takes jobs in arrival order and answers them:

- non-streamed greedy jobs with the same `max_new_tokens` are batched: the worker takes the oldest pending job
  and every other pending job that may share its `generate` call, up to `max_batch`, collates their inputs
  into one left-padded batch and answers all of them at once (left padding lets each row decode as it would
  alone, so a batched answer equals the single one);
- streamed and sampled jobs run alone: a stream hands out text as it grows, and a seeded draw must not depend on
  which other prompts happened to share the batch.

A job's result arrives through its `concurrent.futures.Future` (handlers await it with `asyncio.wrap_future`);
a streamed job's text pieces also go to its `on_text` callback as they are decoded.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.generation.streamers import BaseStreamer

from mllm.model.generation import GenerationSettings, TextDeltaStreamer, generate, stop_token_ids


class EngineBusy(Exception):
    """The queue is full; the client should retry later."""


class EngineClosed(Exception):
    """The engine was shut down before the job ran."""


class ClientGone(Exception):
    """Raised inside a streamed generation whose client went away, to stop decoding for nobody."""


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (a stop token ended it) or "length" (max_new_tokens reached)
    completion_tokens: int  # new tokens before the stop token


@dataclass
class Job:
    """One prompt to answer: `inputs` is the processor's output for this prompt alone (batch of one)."""

    inputs: dict
    prompt_tokens: int
    settings: GenerationSettings
    seed: int | None = None
    on_text: Callable[[str], None] | None = None  # set: a streamed job, text pieces go here
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys may share one `generate` call; None: this job runs alone."""
        if self.on_text is not None or self.settings.decoding != "greedy" or self.settings.overrides:
            return None
        return ("greedy", self.settings.max_new_tokens, self.settings.min_new_tokens)

    def cancel(self) -> None:
        """The client went away: drop the job if it has not started, stop its stream if it has."""
        self.cancelled.set()
        self.future.cancel()


def collate(samples: list[dict], pad_id: int) -> dict:
    """One left-padded batch from one-prompt processor outputs, as the processor would give for all prompts at once.

    Prompts are prepared (images decoded and sliced, text tokenized) one by one in the request handlers; joining
    them here means the worker never repeats that work and a bad prompt fails in its own request only.
    """
    longest = max(s["input_ids"].shape[1] for s in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)  # (B, L)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": [], "tgt_sizes": [],
             "image_bound": [], "image_sizes": []}
    for row, sample in enumerate(samples):
        if sample["input_ids"].shape[0] != 1:
            raise ValueError("collate joins one-prompt processor outputs")
        length = sample["input_ids"].shape[1]
        shift = longest - length  # left padding moves every position of this row right by `shift`
        input_ids[row, shift:] = sample["input_ids"][0]
        attention_mask[row, shift:] = sample["attention_mask"][0]
        batch["image_bound"].append(sample["image_bound"][0] + shift)
        for key in ("pixel_values", "tgt_sizes", "image_sizes"):
            batch[key].append(sample[key][0])
    return batch


class TokenRecorder(BaseStreamer):
    """Keeps the new token ids of every row of a batch, for usage counts and finish reasons."""

    def __init__(self, batch_size: int):
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]

    def put(self, value: torch.Tensor) -> None:
        tokens = value.reshape(-1).tolist()
        if len(tokens) == len(self.rows):  # one new token per row (anything else is not a decoding step)
            for row, token in zip(self.rows, tokens):
                row.append(token)

    def end(self) -> None:
        pass


class StreamSink(TextDeltaStreamer):
    """`TextDeltaStreamer` that hands each released piece to a callback and stops when the client is gone."""

    def __init__(self, tokenizer, stop_ids: list[int], on_text: Callable[[str], None], cancelled: threading.Event):
        super().__init__(tokenizer, stop_ids)
        self.on_text, self.cancelled = on_text, cancelled

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise ClientGone()  # unwinds the decode loop: no more steps for a closed connection
        super().put(value)

    def _release(self, text: str) -> None:
        # The parent's queue is for iterating in another thread; the worker calls back instead (the pieces
        # queued there as well are never read, a few hundred bytes per answer).
        before = self.emitted
        super()._release(text)
        if self.emitted != before:
            self.on_text(self.emitted[len(before):])


class BatchingEngine:
    """The worker thread and its queue. `start()` before submitting, `close()` when done."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_pending: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_pending = max_batch, max_pending
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._paused = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self.batch_sizes: Counter[int] = Counter()  # generate calls run, by how many jobs shared them

    # ---- the handlers' side ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mllm-serve-worker", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._queue) >= self.max_pending:
                raise EngineBusy(f"{len(self._queue)} requests are already waiting; retry later")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def pause(self) -> None:
        """Hold jobs in the queue (they keep arriving); `resume` lets the worker take them, batched."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def stats(self) -> dict:
        with self._cond:
            sizes = dict(sorted(self.batch_sizes.items()))
            return {"batches": sum(sizes.values()), "requests": sum(k * n for k, n in sizes.items()),
                    "largest_batch": max(sizes, default=0), "batch_sizes": sizes, "pending": len(self._queue),
                    "max_batch": self.max_batch}

    def close(self) -> None:
        """Stop the worker after the job it is running; jobs still queued fail with `EngineClosed`."""
        with self._cond:
            self._closing = True
            left, self._queue = list(self._queue), deque()
            self._cond.notify()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineClosed("the server shut down before this request ran"))
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ---- the worker's side ----------------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._answer(batch)

    def _take(self) -> list[Job] | None:
        """The next jobs to run together (oldest first); [] when all taken were cancelled; None when closing."""
        with self._cond:
            while not self._closing and (self._paused or not self._queue):
                self._cond.wait()
            if self._closing:
                return None
            first = self._queue.popleft()
            batch = [first]
            key = first.batch_key
            if key is not None:
                rest = deque()
                for job in self._queue:
                    if len(batch) < self.max_batch and job.batch_key == key:
                        batch.append(job)
                    else:
                        rest.append(job)
                self._queue = rest
        # A future cancelled while queued (its client left) is not run; the others are marked running.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _answer(self, batch: list[Job]) -> None:
        try:
            completions = self._generate(batch)
        except Exception as err:
            if len(batch) == 1:
                batch[0].future.set_exception(err)
                return
            for job in batch:  # one bad prompt must not fail its neighbours: answer each alone
                try:
                    job.future.set_result(self._generate([job])[0])
                except Exception as single_err:
                    job.future.set_exception(single_err)
            return
        for job, completion in zip(batch, completions):
            job.future.set_result(completion)

    def _generate(self, batch: list[Job]) -> list[Completion]:
        settings = batch[0].settings
        if batch[0].seed is not None:
            torch.manual_seed(batch[0].seed)  # only the worker draws, so the global generator is ours alone
        if batch[0].on_text is not None:
            job = batch[0]
            sink = StreamSink(self.tokenizer, self.stop_ids, job.on_text, job.cancelled)
            generate(self.model, job.inputs, self.tokenizer, settings, streamer=sink)
            completions = [Completion(sink.emitted, "stop" if sink.stopped else "length", len(sink.tokens))]
        else:
            inputs = batch[0].inputs if len(batch) == 1 else collate([job.inputs for job in batch], self.pad_id)
            recorder = TokenRecorder(len(batch))
            texts = generate(self.model, inputs, self.tokenizer, settings, streamer=recorder)
            completions = [self._completion(text, ids, settings.max_new_tokens)
                           for text, ids in zip(texts, recorder.rows)]
        with self._cond:
            self.batch_sizes[len(batch)] += 1
        return completions

    def _completion(self, text: str, ids: list[int], max_new_tokens: int) -> Completion:
        for count, token in enumerate(ids):
            if token in self.stop_ids:
                return Completion(text, "stop", count)
        if not ids:  # a decode path that reported no steps: count the answer's own tokens
            count = len(self.tokenizer.encode(text, add_special_tokens=False))
            return Completion(text, "length" if count >= max_new_tokens else "stop", count)
        return Completion(text, "length", len(ids))
