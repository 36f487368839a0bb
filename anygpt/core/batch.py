"""Batched generation: several requests answered together (the LLM's prefill and decoding of every prompt at once,
each decoder called once for the media of the batch), as ``AnyGPTPipeline.run_batch``; the server batches its
concurrent requests with it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from anygpt.base.errors import UsageError
from anygpt.base.modality import Modality
from anygpt.core.conversation import Conversation
from anygpt.core.output import AnyGPTOutput
from anygpt.core.request import GenerationRequest
from anygpt.core.tokens import SignalTokenProcessor, reply_text

logger = logging.getLogger(__name__)


def serialized(method: Callable) -> Callable:
    """Run a pipeline method holding the pipeline's re-entrant call lock (``_call_lock``) for the whole call, so
    that calls from several threads run one after the other and never share the scheduler, adapters or RNGs."""

    @functools.wraps(method)
    def locked(self, *args: Any, **kwargs: Any) -> Any:
        with self._call_lock:
            return method(self, *args, **kwargs)

    return locked


class BatchGenerationMixin:
    """``run_batch`` and its steps, mixed into ``AnyGPTPipeline`` (they use its single-call steps: ``check_inputs``,
    ``build_inputs``, ``decode``, ``_add_user_turn``, ``_allowed_signals``, ``_end_of_turn``, ``_complete_reply``)."""

    @serialized
    @torch.no_grad()
    def run_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        conversations: Sequence[Conversation | None] | None = None,
        streamers: Sequence[Any] | None = None,
        show_progress: bool = False,
    ) -> list[AnyGPTOutput]:
        """Answer several requests together (a server's batch): the LLM prefills and decodes every reply in one
        loop over a left-padded batch, then each decoder runs once for the media of the batch that share its
        settings, each item with its own generator (``seed + offset``, as ``run`` seeds it).

        Each request keeps its own modalities, decoding settings (``max_new_tokens``, ``temperature``, ``top_p``,
        sampling with a generator seeded by its ``seed``), decoder settings and conversation. What cannot share a
        batch is split: requests running different LoRA adapters form separate batches (a batch of one is a plain
        ``run`` call); a model with gated cross-attention gets one media context per row; a reply with several
        signal groups of one modality is rendered by its own decoder call (its groups share one generator, as in
        ``run``).

        Equality with ``run``: each row's tokens are chosen by the same rule, with the same sampling draws and
        decoder noise as ``run``'s for the same seeds, but the numbers are not always bit-identical. The padded
        rows' attention sums run in another order, so logits and conditioning can differ in the last bits (measured
        on the CPU with ``tiny``: up to ~3e-7 in the prompt's logits, ~1e-6 in the decoder conditioning), which a
        greedy choice between two nearly equal logits would show; and a decoder's batched denoiser rounds
        differently from its single call (images differ by up to 1 of 255 levels). Rows of equal prompt length are
        not padded: their tokens are ``run``'s and so is their conditioning, bit for bit with one thread (with
        several, a matrix kernel may split its sums by the number of rows). ``tests/test_serve.py`` checks the
        tokens, the conditioning (within 1e-5), the media (within 2 levels) and the equal-length case.

        Args:
            requests: the calls, each validated (``check_inputs``) before any work starts.
            conversations: one per request (None entries: a fresh one-turn conversation); each gets its user turn
                and reply as in ``run``. Give each conversation once.
            streamers: one per request (None entries: none); each receives its own reply's token ids as ``run``'s
                ``streamer`` does (the prompt's, then one token per step until that reply ends).
            show_progress: progress bars for decoder work.

        Returns:
            One ``AnyGPTOutput`` per request, in order.

        Raises:
            UsageError: lists of different lengths, a conversation given twice, or a bad request (naming its index
                through ``origin`` when the request has one).
        """
        count = len(requests)
        conversations = list(conversations) if conversations is not None else [None] * count
        streamers = list(streamers) if streamers is not None else [None] * count
        if len(conversations) != count or len(streamers) != count:
            raise UsageError(
                f"run_batch: {count} requests, {len(conversations)} conversations and {len(streamers)} streamers"
            )
        given = [id(c) for c in conversations if c is not None]
        if len(given) != len(set(given)):
            raise UsageError("run_batch: a conversation goes on one request at a time; one was given twice")
        forced = [self.check_inputs(request) for request in requests]
        selections = [self.select_adapters(r.adapters, f) for r, f in zip(requests, forced, strict=True)]
        groups: dict[str, list[int]] = {}
        for index, selection in enumerate(selections):
            groups.setdefault(repr(selection), []).append(index)
        results: list[AnyGPTOutput | None] = [None] * count
        for indices in groups.values():
            if len(indices) == 1:  # a batch of one is a plain call (bit-identical to ``run``)
                index = indices[0]
                results[index] = self.run(
                    requests[index],
                    conversation=conversations[index],
                    streamer=streamers[index],
                    show_progress=show_progress,
                )
                continue
            if selections[indices[0]] is not None:
                self.model.set_lora_adapters(*selections[indices[0]])
            outputs = self._run_rows(
                [requests[i] for i in indices],
                [conversations[i] for i in indices],
                [streamers[i] for i in indices],
                [forced[i] for i in indices],
                show_progress,
            )
            for index, output in zip(indices, outputs, strict=True):
                results[index] = output
        return results

    def _run_rows(
        self,
        requests: list[GenerationRequest],
        conversations: list[Conversation | None],
        streamers: list[Any],
        forced: list[set[Modality] | None],
        show_progress: bool,
    ) -> list[AnyGPTOutput]:
        """One batch of requests that run the same LoRA adapters."""
        added: list[Conversation] = []
        try:
            for request, conversation in zip(requests, conversations, strict=True):
                added.append(self._add_user_turn(conversation, request))
            replies = self._generate_batch(added, requests, forced, streamers)
        except BaseException:
            for conversation in added:
                conversation.turns.pop()  # the failed user turns are not kept
            raise
        finally:
            if self.model.cross_attention is not None:
                self.model.cross_attention.set_context(None)
        results = []
        signal_ids = self.model.tokens.all_signal_ids
        for conversation, (generated, conditioning) in zip(added, replies, strict=True):
            text = reply_text(self.tokenizer, generated, signal_ids)
            conversation.add_assistant(text, generated)
            results.append(
                AnyGPTOutput(
                    text=text,
                    token_ids=generated,
                    conditioning={m.value: c for m, c in conditioning.items()},
                )
            )
        self._render_batch(results, [c for _, c in replies], requests, show_progress)
        return results

    def _generate_batch(
        self,
        conversations: list[Conversation],
        requests: list[GenerationRequest],
        forced: list[set[Modality] | None],
        streamers: list[Any],
    ) -> list[tuple[list[int], dict[Modality, torch.Tensor]]]:
        """The LLM's replies to several conversations in one left-padded batch, and their decoder conditioning."""
        built, contexts = [], []
        for conversation in conversations:
            built.append(self.build_inputs(conversation))  # (1, T_i), (1, T_i, H)
            if self.model.cross_attention is not None:
                contexts.append(self.model.cross_attention.context)
        lengths = [ids.shape[1] for ids, _ in built]
        rows, width = len(built), max(lengths)
        first = built[0][1]
        inputs_embeds = first.new_zeros((rows, width, first.shape[-1]))  # (B, T, H), left-padded
        attention_mask = torch.zeros((rows, width), dtype=torch.long, device=first.device)
        for row, ((_, embeds), length) in enumerate(zip(built, lengths, strict=True)):
            inputs_embeds[row, width - length :] = embeds[0]
            attention_mask[row, width - length :] = 1
        if self.model.cross_attention is not None:
            self.model.cross_attention.set_context(*_stack_contexts(contexts))
        tokens = self.model.tokens
        processors = [SignalTokenProcessor(tokens, allowed=self._allowed_signals(f)) for f in forced]
        sampler = _RowSampler(processors, requests)
        limits = _RowLimits([r.max_new_tokens for r in requests], self.tokenizer.eos_token_id)
        stop = self._end_of_turn()  # the template's stop strings and role markers, as in generate_tokens
        if stop:
            limits.stop_strings = StopStringCriteria(tokenizer=self.tokenizer, stop_strings=stop)
        streamer = _RowStreamers(streamers, limits) if any(s is not None for s in streamers) else None
        out = self.model.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=max(limits.limits),
            do_sample=False,  # each sampled row draws from its own generator (_RowSampler)
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([limits]),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            streamer=streamer,
        )
        sequences = out.sequences.tolist()
        generated = []
        for row, request in enumerate(requests):
            end = limits.ends[row] or request.max_new_tokens
            generated.append(self._complete_reply(sequences[row][:end], forced[row]))
        cache = getattr(out, "past_key_values", None)
        conditioning = self._batch_conditioning(built, attention_mask, generated, cache)
        return list(zip(generated, conditioning, strict=True))

    def _batch_conditioning(
        self,
        built: list[tuple[torch.Tensor, torch.Tensor]],
        attention_mask: torch.Tensor,
        generated: list[list[int]],
        cache: Any,
    ) -> list[dict[Modality, torch.Tensor]]:
        """``signal_conditioning`` of the batch's replies: one forward over the replies that hold signal groups,
        reusing the prompts' key/value cache (right-padded replies after the left-padded prompts)."""
        signal = self.model.tokens.signal
        present = [[m for m in self.decoders if set(signal[m]) & set(ids)] for ids in generated]
        result: list[dict[Modality, torch.Tensor]] = [{} for _ in generated]
        rows = [row for row, modalities in enumerate(present) if modalities]
        if not rows:
            return result
        width = attention_mask.shape[1]
        if cache is None or cache.get_seq_length() < width:  # no usable cache: one row at a time
            for row in rows:
                input_ids, inputs_embeds = built[row]
                result[row] = self.signal_conditioning(input_ids, inputs_embeds, generated[row])
            return result
        extra = cache.get_seq_length() - width
        if extra > 0:
            cache.crop(-extra)  # keep the prompts' part only
        index = torch.tensor(rows, device=attention_mask.device)
        if len(rows) < len(generated):
            cache.batch_select_indices(index)
        llm = self.model.language_model
        length = max(len(generated[row]) for row in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        gen = torch.full((len(rows), length), pad, dtype=torch.long, device=attention_mask.device)
        gen_mask = torch.zeros_like(gen)
        for j, row in enumerate(rows):
            gen[j, : len(generated[row])] = torch.tensor(generated[row])
            gen_mask[j, : len(generated[row])] = 1
        prompt_mask = attention_mask[index]
        positions = prompt_mask.sum(dim=1, keepdim=True) + torch.arange(length, device=gen.device)  # (B', L)
        gen_embeds = llm.get_input_embeddings()(gen).to(built[0][1].dtype)
        narrow = self.model.cross_attention.rows(index) if self.model.cross_attention is not None else nullcontext()
        with narrow:
            out = llm(
                inputs_embeds=gen_embeds,
                attention_mask=torch.cat([prompt_mask, gen_mask], dim=1),
                position_ids=positions,
                past_key_values=cache,
                output_hidden_states=True,
                use_cache=True,
            )
        hidden = out.hidden_states[-1]  # (B', L, H)
        for j, row in enumerate(rows):
            ids = torch.tensor([generated[row]], device=gen.device)
            states = hidden[j : j + 1, : len(generated[row])]
            result[row] = {m: self.model.signal_conditioning(m, states, ids)[0] for m in present[row]}
        return result

    def _render_batch(
        self,
        results: list[AnyGPTOutput],
        conditioning: list[dict[Modality, torch.Tensor]],
        requests: list[GenerationRequest],
        show_progress: bool,
    ) -> None:
        """Each decoder once per set of equal settings for the batch's single-group media, each item with the
        generator ``run`` gives it (``seed + offset``; a fresh random one without a seed); a reply with several
        groups of one modality is rendered on its own (its groups share one generator, as in ``run``)."""
        shared: dict[tuple, list[tuple[int, torch.Tensor, int | None]]] = {}
        alone: list[tuple[int, Modality, torch.Tensor, int | None]] = []
        for row, (request, groups) in enumerate(zip(requests, conditioning, strict=True)):
            for offset, (modality, cond) in enumerate(groups.items()):
                seed = None if request.seed is None else request.seed + offset
                if cond.shape[0] == 1:
                    settings = tuple(sorted(request.decoder_settings(modality).items()))
                    shared.setdefault((modality, settings), []).append((row, cond, seed))
                else:
                    alone.append((row, modality, cond, seed))
        for (modality, settings), items in shared.items():
            generators = [torch.Generator(device="cpu") for _ in items]
            for generator, (_, _, seed) in zip(generators, items, strict=True):
                generator.manual_seed(seed) if seed is not None else generator.seed()
            outputs = self.decoders[modality].generate(
                torch.cat([cond for _, cond, _ in items]),
                generator=generators,
                show_progress=show_progress,
                **dict(settings),
            )
            for (row, _, _), output in zip(items, outputs, strict=True):
                getattr(results[row], modality.plural).append(output)
        for row, modality, cond, seed in alone:
            settings = requests[row].decoder_settings(modality)
            outputs = self.decode(modality, cond, seed=seed, show_progress=show_progress, **settings)
            getattr(results[row], modality.plural).extend(outputs)


class _RowSampler(LogitsProcessor):
    """The token choice of each row of a batched ``generate``, made as ``generate_tokens`` makes it for that row
    alone: the row's ``SignalTokenProcessor``, then for a sampled row (``temperature > 0``) transformers' temperature
    and top-p warpers and a draw from the row's own generator, seeded with its request's seed as ``run`` seeds the
    global RNG (a random seed without one). A sampled row's scores come back one-hot, so greedy decoding keeps the
    draw."""

    def __init__(self, processors: list[SignalTokenProcessor], requests: list[GenerationRequest]):
        self.processors = processors
        self.requests = requests
        self.generators: list[torch.Generator | None] = [None] * len(requests)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.empty_like(scores)
        for row, (processor, request) in enumerate(zip(self.processors, self.requests, strict=True)):
            ids = input_ids[row : row + 1]
            row_scores = processor(ids, scores[row : row + 1])  # (1, V)
            if request.temperature > 0:
                if request.temperature != 1.0:
                    row_scores = TemperatureLogitsWarper(request.temperature)(ids, row_scores)
                if request.top_p < 1.0:
                    row_scores = TopPLogitsWarper(request.top_p)(ids, row_scores)
                probs = torch.nn.functional.softmax(row_scores, dim=-1)
                token = torch.multinomial(probs, num_samples=1, generator=self._generator(row, scores.device))
                row_scores = torch.full_like(row_scores, float("-inf"))
                row_scores[0, token[0, 0]] = 0.0
            out[row] = row_scores[0]
        return out

    def _generator(self, row: int, device: torch.device) -> torch.Generator:
        if self.generators[row] is None:
            generator = torch.Generator(device=device)
            seed = self.requests[row].seed
            generator.manual_seed(seed) if seed is not None else generator.seed()
            self.generators[row] = generator
        return self.generators[row]


class _RowLimits(StoppingCriteria):
    """Ends each row of a batched ``generate`` where ``generate_tokens`` would end it alone: at its own
    ``max_new_tokens``, at EOS, at the end of a turn (``stop_strings``: the template's ``end_of_turn``); ``ends[row]``
    is the length at which it ended (None while it runs)."""

    def __init__(self, limits: list[int], eos_token_id: int | None):
        self.limits = limits
        self.eos_token_id = eos_token_id
        self.stop_strings: StoppingCriteria | None = None
        self.ends: list[int | None] = [None] * len(limits)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        length = input_ids.shape[1]
        done = torch.tensor([length >= limit for limit in self.limits], device=input_ids.device)
        if self.eos_token_id is not None:
            done |= input_ids[:, -1] == self.eos_token_id
        if self.stop_strings is not None:
            done |= self.stop_strings(input_ids, scores).to(done.device)
        for row, end in enumerate(self.ends):
            if end is None and bool(done[row]):
                self.ends[row] = length
        return done


class _RowStreamers:
    """A transformers streamer for a batched ``generate`` that hands each row's tokens to that row's own streamer
    (None: none) until the row ends, as ``generate`` alone would: the prompt's ids first, then one token a step."""

    def __init__(self, streamers: list[Any], limits: _RowLimits):
        self.streamers = streamers
        self.limits = limits
        self.steps = -1  # the first put holds the prompt's ids

    def put(self, value: torch.Tensor) -> None:
        self.steps += 1
        for row, streamer in enumerate(self.streamers):
            end = self.limits.ends[row]
            if streamer is not None and (self.steps == 0 or end is None or self.steps <= end):
                streamer.put(value[row : row + 1])

    def end(self) -> None:
        for streamer in self.streamers:
            if streamer is not None:
                streamer.end()


def _stack_contexts(
    contexts: list[tuple[torch.Tensor, torch.Tensor] | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One gated cross-attention context (B, S, H) and mask (B, S) from each row's own ((1, S_i, H), (1, S_i)), or
    None for a row without media."""
    present = [context for context in contexts if context is not None]
    if not present:
        return None, None
    sample = present[0][0]
    size = max(media.shape[1] for media, _ in present)
    media = sample.new_zeros((len(contexts), size, sample.shape[-1]))
    mask = torch.zeros((len(contexts), size), dtype=torch.bool, device=sample.device)
    for row, context in enumerate(contexts):
        if context is not None:
            media[row, : context[0].shape[1]] = context[0][0]
            mask[row, : context[1].shape[1]] = context[1][0]
    return media, mask
