"""The batch worker: one thread owns the pipeline; requests wait in a bounded queue and run together in batches.

The HTTP side never touches the model: it validates a request, reads its media, and hands a ``Job`` to
``BatchWorker.submit``; while it does, the request is announced (``BatchWorker.incoming``). The worker takes every
waiting job (up to ``max_batch_size``) and, while announced requests are still on their way, waits up to
``batch_wait_s`` for them (a lone request does not wait); it builds each job's conversation (its earlier turns,
their media encoded) and answers them with one ``AnyGPTPipeline.run_batch`` call. When a batch fails, its jobs run
again one by one, so a request that breaks the model fails alone. Encoder features are kept in a small LRU by media
content, so a conversation's images (sent again with every turn, as OpenAI clients do) are encoded once.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from anygpt.apps.server.protocol import HistoryTurn
from anygpt.base.errors import UsageError
from anygpt.base.modality import MEDIA_MODALITIES
from anygpt.core.conversation import Conversation, MediaRef, get_template
from anygpt.core.pipeline import AnyGPTOutput, AnyGPTPipeline
from anygpt.core.request import GenerationRequest

logger = logging.getLogger(__name__)

__all__ = ["BatchWorker", "DeltaStreamer", "Job", "JobResult", "RawTokens", "finish_reason"]


@dataclass
class JobResult:
    """What a job produced.

    Attributes:
        output: the pipeline's answer.
        prompt_tokens: the LLM's input length (the conversation with its media placeholders).
        completion_tokens: the reply's tokens (signal groups included).
        finish_reason: ``"length"`` when the LLM ran into ``max_new_tokens`` (it wrote that many tokens and none
            ended the reply: no EOS, no end of the turn), else ``"stop"``. A forced signal group the pipeline
            appended after the reply is not counted against the limit; one the LLM wrote itself is
            (``RawTokens``).
    """

    output: AnyGPTOutput
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(eq=False)
class Job:
    """One request for the worker.

    Attributes:
        request: the last user message as a ``GenerationRequest`` (validated, checked against the model).
        history: the turns before it.
        streamer: receives the reply's tokens as they are generated (a ``DeltaStreamer``), or None.
        future: resolved with a ``JobResult`` or the exception that ended the job; cancelling it before the job
            starts drops the job.
    """

    request: GenerationRequest
    history: list[HistoryTurn] = field(default_factory=list)
    streamer: Any = None
    future: Future = field(default_factory=Future)


class DeltaStreamer:
    """A transformers streamer that passes a reply's new text to ``emit`` as the LLM writes it.

    Only text the final reply will start with is passed: leading and trailing blanks and a possible beginning of
    one of ``stop`` (the chat template's end of a turn, ``stop_strings``: its stop strings and role markers) wait for
    what follows, and nothing from a stop string on is passed, so the pieces add up to a prefix of
    ``AnyGPTOutput.text`` (``sent``); the caller sends the rest when the job ends.
    """

    def __init__(self, tokenizer, emit: Callable[[str], None], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.emit = emit
        self.stop = [s for s in stop if s]
        self.sent = ""
        self.restart()

    def restart(self) -> None:
        """Start over on a new run of the same request (the text already passed is not passed again)."""
        self.ids: list[int] = []
        self.started = False
        self.stopped = False

    def put(self, value) -> None:
        if not self.started:  # generate() first passes the prompt's ids (none with inputs_embeds)
            self.started = True
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            return
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                text, self.stopped = text[:at], True
        if not self.stopped:
            text = _without_stop_prefix(text, self.stop)
        text = text.rstrip()
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit(text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        pass


class RawTokens:
    """A transformers streamer that records the token ids the LLM wrote for one reply and passes every call on to
    ``inner`` (another streamer, or None).

    The ids are the raw ones, before the pipeline cut the reply at the end of its turn and appended the forced
    signal groups it lacked (``AnyGPTOutput.token_ids`` holds those, and cannot tell an appended group from one the
    LLM wrote itself right before the limit), so they say why the reply ended (``finish_reason``).
    """

    def __init__(self, inner: Any = None):
        self.inner = inner
        self.ids: list[int] = []
        self.started = False

    def restart(self) -> None:
        """Start over on a new run of the same request."""
        self.ids = []
        self.started = False
        if self.inner is not None and hasattr(self.inner, "restart"):
            self.inner.restart()

    def put(self, value) -> None:
        if self.started:
            self.ids.extend(value.reshape(-1).tolist())
        self.started = True  # generate() first passes the prompt's ids (none with inputs_embeds)
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def finish_reason(raw: Sequence[int], max_new_tokens: int, tokenizer, stop: Sequence[str]) -> str:
    """``"length"`` when the LLM wrote ``max_new_tokens`` tokens (``raw``, as ``RawTokens`` records them) and
    none of them ended the reply (EOS, or one of ``stop``: the template's end of a turn), else ``"stop"``."""
    if len(raw) < max_new_tokens:
        return "stop"
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in raw:
        return "stop"
    text = tokenizer.decode(list(raw), skip_special_tokens=False)
    return "stop" if any(s and s in text for s in stop) else "length"


def _without_stop_prefix(text: str, stops: list[str]) -> str:
    """``text`` without a tail that could be the beginning of one of ``stops``."""
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                return text[:-size]
    return text


class BatchWorker:
    """The thread that owns the pipeline and answers jobs in batches.

    Args:
        pipe: the pipeline; nothing else may call it while the worker runs.
        max_batch_size: the most jobs answered by one ``run_batch`` call.
        queue_size: the most jobs waiting (not counting the batch running); ``submit`` raises ``queue.Full`` beyond.
        batch_wait_s: how long a batch waits at most for the requests announced (``incoming``) but not yet
            submitted; nothing is waited for when none is announced.
        feature_cache_size: how many media items' encoder features are kept (LRU by content); 0: none.
        exact: ``run_batch``'s ``exact``: a batched reply whose token choice came within rounding of a tie is
            answered again alone, so every reply's tokens are those of a lone call; False keeps the batch's.
    """

    def __init__(
        self,
        pipe: AnyGPTPipeline,
        *,
        max_batch_size: int = 8,
        queue_size: int = 64,
        batch_wait_s: float = 0.01,
        feature_cache_size: int = 64,
        exact: bool = True,
    ):
        if max_batch_size < 1 or queue_size < 1 or batch_wait_s < 0 or feature_cache_size < 0:
            raise UsageError(
                "worker: max_batch_size and queue_size must be >= 1, batch_wait_s and feature_cache_size >= 0; got "
                f"{max_batch_size}, {queue_size}, {batch_wait_s}, {feature_cache_size}"
            )
        self.pipe = pipe
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.feature_cache_size = feature_cache_size
        self.exact = exact
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._features: OrderedDict[str, Any] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._running = 0
        self._incoming = 0
        self._incoming_lock = threading.Lock()
        self.batches = 0
        self.requests = 0
        self.largest_batch = 0

    # ------------------------------------------------------------------ life
    def start(self) -> BatchWorker:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="anygpt-serve-worker", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking jobs, fail those still waiting, and let the running batch end (up to ``timeout`` s)."""
        self._closed = True
        for job in self._drain():
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def running(self) -> bool:
        """Whether jobs are taken (started, not closed, and the thread alive)."""
        return not self._closed and self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; returns its future.

        Raises:
            queue.Full: ``queue_size`` jobs are already waiting.
            RuntimeError: the worker is not running.
        """
        if not self.running:
            raise RuntimeError("the worker is not running")
        self._queue.put_nowait(job)
        return job.future

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request while it is read and checked (submit it inside): a batch being formed waits for it
        (up to ``batch_wait_s``)."""
        with self._incoming_lock:
            self._incoming += 1
        try:
            yield
        finally:
            with self._incoming_lock:
                self._incoming -= 1

    def stats(self) -> dict[str, int]:
        return {
            "queued": self._queue.qsize(),
            "running": self._running,
            "batches": self.batches,
            "requests": self.requests,
            "largest_batch": self.largest_batch,
            "max_batch_size": self.max_batch_size,
        }

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            batch, last = self._collect()
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # cancelled: dropped
            if batch:
                self._running = len(batch)
                try:
                    self._answer(batch)
                except Exception as error:  # never let the loop die; each job learns what happened
                    logger.exception("batch failed")
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(error)
                finally:
                    self._running = 0
            if last:
                return

    def _collect(self) -> tuple[list[Job], bool]:
        """The next batch: the first job, every job waiting, and those announced that arrive within
        ``batch_wait_s``; and whether to stop after it."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._incoming:
                    break
                try:
                    job = self._queue.get(timeout=min(remaining, 0.002))
                except queue.Empty:
                    continue
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _drain(self) -> list[Job]:
        jobs = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _answer(self, jobs: list[Job]) -> None:
        """Build the jobs' conversations and answer them together; run them one by one if the batch fails."""
        ready, conversations = [], []
        for job in jobs:
            try:
                conversations.append(self._conversation(job))
                ready.append(job)
            except Exception as error:
                job.future.set_exception(error)
        if not ready:
            return
        raws = [RawTokens(job.streamer) for job in ready]
        try:
            outputs = self.pipe.run_batch(
                [job.request for job in ready],
                conversations=conversations,
                streamers=raws,
                show_progress=False,
                exact=self.exact,
            )
        except Exception as error:
            if len(ready) == 1:
                ready[0].future.set_exception(error)
                return
            logger.warning("a batch of %d failed (%s); answering its requests one by one", len(ready), error)
            for job in ready:
                if job.streamer is not None:
                    job.streamer.restart()
                self._answer([job])
            return
        self.batches += 1
        self.requests += len(ready)
        self.largest_batch = max(self.largest_batch, len(ready))
        for job, conversation, output, raw in zip(ready, conversations, outputs, raws, strict=True):
            self._remember(conversation)
            job.future.set_result(self._result(job.request, conversation, output, raw.ids))

    def _conversation(self, job: Job) -> Conversation:
        """The job's earlier turns as a ``Conversation`` (their media encoded, or taken from the feature cache), with
        the features of the last message's media already known put in."""
        pipe = self.pipe
        conversation = Conversation(template=pipe.config.llm.template)
        for turn in job.history:
            if turn.role == "user":
                loaded = [pair for m in MEDIA_MODALITIES for pair in pipe.load_inputs(m, turn.media.get(m, []))]
                self._recall(conversation, [ref for ref, _ in loaded])
                pipe.encode_media(conversation, loaded)
                conversation.add_user(turn.text, [ref for ref, _ in loaded])
            else:
                ids, _ = pipe.model.tokenize_pieces([turn.text], add_bos=False)
                conversation.add_assistant(turn.text, ids)
        last = [ref for m in MEDIA_MODALITIES for ref, _ in pipe.load_inputs(m, job.request.media(m))]
        self._recall(conversation, last)
        return conversation

    def _recall(self, conversation: Conversation, refs: list[MediaRef]) -> None:
        for ref in refs:
            if ref.key in self._features:
                self._features.move_to_end(ref.key)
                conversation.features[ref.key] = self._features[ref.key]

    def _remember(self, conversation: Conversation) -> None:
        if not self.feature_cache_size:
            return
        for key, value in conversation.features.items():
            self._features[key] = value
            self._features.move_to_end(key)
        while len(self._features) > self.feature_cache_size:
            self._features.popitem(last=False)

    def _result(
        self, request: GenerationRequest, conversation: Conversation, output: AnyGPTOutput, raw: list[int]
    ) -> JobResult:
        pipe = self.pipe
        asked = Conversation(template=conversation.template, turns=conversation.turns[:-1])  # without the reply
        prompt_ids, _ = pipe.model.tokenize_pieces(asked.prompt_pieces(pipe.tokenizer.eos_token_id))
        return JobResult(
            output=output,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(output.token_ids),
            finish_reason=finish_reason(raw, request.max_new_tokens, pipe.tokenizer, stop_strings(pipe)),
        )


def stop_strings(pipe: AnyGPTPipeline) -> tuple[str, ...]:
    """The text that ends a reply besides EOS: the chat template's ``end_of_turn`` (its stop strings and role
    markers such as ``USER:``), which a ``DeltaStreamer`` never passes on."""
    return get_template(pipe.config.llm.template).end_of_turn
