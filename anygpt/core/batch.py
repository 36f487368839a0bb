"""Batched generation: several requests answered together (the LLM's prefill and decoding of every prompt at once,
each decoder called once for the media of the batch), as ``AnyGPTPipeline.run_batch``; the server batches its
concurrent requests with it."""

from __future__ import annotations

import functools
import logging
import math
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
        exact: bool = True,
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

        Equality with ``run`` (the same request alone, the same seed): the tokens are the same, and so are the
        sampling draws (a sampled row draws from its own generator, seeded as ``run`` seeds the global one) and the
        decoders' noise (each item its own generator, ``seed + offset``). The numbers are not all bit-identical: a
        batched matrix product rounds differently from a lone one (another kernel for another number of rows; a
        left-padded row's attention sums run in another order), so the logits differ in their last bits (measured
        on the CPU: at most 6 float32 epsilons of the row's largest logit, 2 in float16), the decoder conditioning
        by up to ~1e-6 and the media by up to 1 of 255 levels (the batched denoiser rounds differently too). Such
        a difference could change a token only where two choices are within rounding of each other, so with
        ``exact`` each row's choice is checked at every step: a greedy row's two best logits, a sampled row's
        top-p cut and its draw (the same exponential race ``torch.multinomial`` runs) must be further apart than
        ``2 * EXACT_MARGIN_EPS`` epsilons of the LLM's dtype times the row's largest logit (|logit| >= 1). A row
        that comes closer stops there and is answered again by ``run`` alone, its streamer resuming after the
        tokens it already has; so every row's tokens are ``run``'s, and a re-run row's numbers and media are
        ``run``'s bit for bit. ``exact=False`` keeps the batch's choices, which differ from ``run``'s only where two
        choices are within rounding of each other (far more often in half precision, where the check would re-run
        many rows). ``tests/test_serve_batching.py`` checks all of this.

        Args:
            requests: the calls, each validated (``check_inputs``) before any work starts.
            conversations: one per request (None entries: a fresh one-turn conversation); each gets its user turn
                and reply as in ``run``. Give each conversation once.
            streamers: one per request (None entries: none); each receives its own reply's token ids as ``run``'s
                ``streamer`` does (the prompt's, then one token per step until that reply ends).
            show_progress: progress bars for decoder work.
            exact: re-run alone a row whose token choice came within rounding of a tie (above).

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
                exact,
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
        exact: bool,
    ) -> list[AnyGPTOutput]:
        """One batch of requests that run the same LoRA adapters; the rows the batch could not answer exactly
        (``_RowSampler.unsure``) are answered again alone."""
        added: list[Conversation] = []
        try:
            for request, conversation in zip(requests, conversations, strict=True):
                added.append(self._add_user_turn(conversation, request))
            replies, unsure = self._generate_batch(added, requests, forced, streamers, exact)
        except BaseException:
            for conversation in added:
                conversation.turns.pop()  # the failed user turns are not kept
            raise
        finally:
            if self.model.cross_attention is not None:
                self.model.cross_attention.set_context(None)
        results: list[AnyGPTOutput | None] = [None] * len(requests)
        signal_ids = self.model.tokens.all_signal_ids
        batched = [row for row in range(len(requests)) if unsure[row] is None]
        for row in batched:
            generated, conditioning = replies[row]
            text = reply_text(self.tokenizer, generated, signal_ids)
            added[row].add_assistant(text, generated)
            results[row] = AnyGPTOutput(
                text=text, token_ids=generated, conditioning={m.value: c for m, c in conditioning.items()}
            )
        self._render_batch(
            [results[row] for row in batched],
            [replies[row][1] for row in batched],
            [requests[row] for row in batched],
            show_progress,
        )
        for row, step in enumerate(unsure):
            if step is None:
                continue
            logger.info("batch row %d: token %d was chosen within rounding of another; answering it alone", row, step)
            added[row].turns.pop()  # run adds the user's turn again (its media stay encoded)
            streamer = None if streamers[row] is None else _Resumed(streamers[row], step - 1)
            results[row] = self.run(
                requests[row], conversation=added[row], streamer=streamer, show_progress=show_progress
            )
        return results

    def _generate_batch(
        self,
        conversations: list[Conversation],
        requests: list[GenerationRequest],
        forced: list[set[Modality] | None],
        streamers: list[Any],
        exact: bool,
    ) -> tuple[list[tuple[list[int], dict[Modality, torch.Tensor]] | None], list[int | None]]:
        """The LLM's replies to several conversations in one left-padded batch, and their decoder conditioning;
        and for each row the (1-based) index of the token whose choice was within rounding of another (``exact``;
        None: every choice was clear), whose reply is None."""
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
        limits = _RowLimits([r.max_new_tokens for r in requests], self.tokenizer.eos_token_id)
        tolerance = EXACT_MARGIN_EPS * torch.finfo(first.dtype).eps if exact else None
        sampler = _RowSampler(processors, requests, limits, tolerance)
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
            if limits.unsure[row] is not None:
                generated.append([])  # answered again alone: no conditioning here
                continue
            end = limits.ends[row] or request.max_new_tokens
            generated.append(self._complete_reply(sequences[row][:end], forced[row]))
        cache = getattr(out, "past_key_values", None)
        conditioning = self._batch_conditioning(built, attention_mask, generated, cache)
        replies = [
            None if limits.unsure[row] is not None else (ids, cond)
            for row, (ids, cond) in enumerate(zip(generated, conditioning, strict=True))
        ]
        return replies, list(limits.unsure)

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


EXACT_MARGIN_EPS = 32
"""How close two token choices of a batched row may come before the row is answered again alone (``run_batch``'s
``exact``): twice this many epsilons of the LLM's dtype, times the row's largest |logit| (at least 1). A batched
row's logits were measured within 6 float32 epsilons (2 in float16) of a lone call's, so a choice this clear is the
lone call's."""


class _RowSampler(LogitsProcessor):
    """The token choice of each row of a batched ``generate``, made as ``generate_tokens`` makes it for that row
    alone: the row's ``SignalTokenProcessor``, then for a sampled row (``temperature > 0``) transformers' temperature
    and top-p warpers and a draw from the row's own generator, seeded with its request's seed as ``run`` seeds the
    global RNG (a random seed without one). A sampled row's scores come back one-hot, so greedy decoding keeps the
    draw.

    With a ``tolerance`` (epsilons of the LLM's dtype, ``EXACT_MARGIN_EPS`` of them), each running row's choice is
    checked: when a lone call's logits, up to ``tolerance`` x the row's largest |logit| away from these, could
    choose another token (a greedy row's two best logits, a sampled row's top-p cut or its draw, closer than twice
    that), ``limits.unsure[row]`` becomes the (1-based) index of that token and the row stops (``_RowLimits``). A
    sampled row without a seed is not checked: a lone call would not repeat it either.
    """

    def __init__(
        self,
        processors: list[SignalTokenProcessor],
        requests: list[GenerationRequest],
        limits: _RowLimits,
        tolerance: float | None = None,
    ):
        self.processors = processors
        self.requests = requests
        self.limits = limits
        self.tolerance = tolerance
        self.generators: list[torch.Generator | None] = [None] * len(requests)
        self.steps = 0  # the index of the token being chosen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps += 1
        out = torch.empty_like(scores)
        for row, (processor, request) in enumerate(zip(self.processors, self.requests, strict=True)):
            ids = input_ids[row : row + 1]
            row_scores = processor(ids, scores[row : row + 1])  # (1, V)
            check = self.tolerance is not None and self.limits.running(row)
            # how far a lone call's logits may be from these (in logits), from the raw scores' scale
            slack = self.tolerance * max(1.0, scores[row].abs().max().item()) if check else 0.0
            if request.temperature > 0:
                check = check and request.seed is not None
                if request.temperature != 1.0:
                    row_scores = TemperatureLogitsWarper(request.temperature)(ids, row_scores)
                slack /= request.temperature  # the warped scores' slack
                warped = row_scores
                if request.top_p < 1.0:
                    row_scores = TopPLogitsWarper(request.top_p)(ids, row_scores)
                probs = torch.nn.functional.softmax(row_scores, dim=-1)
                generator = self._generator(row, scores.device)
                state = generator.get_state() if check else None
                token = torch.multinomial(probs, num_samples=1, generator=generator)
                if state is not None and not _clear_draw(warped, probs, request.top_p, token, state, slack):
                    self.limits.unsure[row] = self.steps
                row_scores = torch.full_like(row_scores, float("-inf"))
                row_scores[0, token[0, 0]] = 0.0
            elif check and not _clear_best(row_scores, slack):
                self.limits.unsure[row] = self.steps
            out[row] = row_scores[0]
        return out

    def _generator(self, row: int, device: torch.device) -> torch.Generator:
        if self.generators[row] is None:
            generator = torch.Generator(device=device)
            seed = self.requests[row].seed
            generator.manual_seed(seed) if seed is not None else generator.seed()
            self.generators[row] = generator
        return self.generators[row]


def _clear_best(scores: torch.Tensor, slack: float) -> bool:
    """Whether the best of ``scores`` (1, V) stays the best (greedy) when every score moves by up to ``slack``."""
    if scores.shape[-1] < 2:
        return True
    best, second = scores[0].topk(2).values.tolist()
    return best - second > 2 * slack


def _clear_draw(
    scores: torch.Tensor, probs: torch.Tensor, top_p: float, token: torch.Tensor, state: torch.Tensor, slack: float
) -> bool:
    """Whether a sampled row draws the same ``token`` when every one of its ``scores`` (1, V: after the temperature,
    before the top-p cut) moves by up to ``slack``.

    ``torch.multinomial``'s draw from ``probs`` (1, V: after the cut) is an exponential race, ``argmax(probs / q)``
    with ``q ~ Exp(1)`` from the generator at ``state``; it is replayed here (a replay that does not pick ``token``,
    another ``torch.multinomial``, counts as unclear). Moving the scores changes each ratio of two probabilities by
    a factor within ``exp(+-2 slack)``, and may move the top-p cut: a token whose cumulative probability (smallest
    first, as ``TopPLogitsWarper`` sums them) is within reach of ``1 - top_p`` may be kept or dropped. The draw is
    clear when ``token`` is surely kept and beats every token that is or may be kept by more than that factor.
    """
    replay = torch.Generator(device=probs.device)
    replay.set_state(state)
    q = torch.empty_like(probs).exponential_(1, generator=replay)
    chosen = int(token.reshape(-1)[0])
    if int((probs / q)[0].argmax()) != chosen:
        return False
    reach = 2 * slack + 1e-6  # the sums and the softmax round as well
    contenders = probs[0] > 0
    if top_p < 1.0:
        values, order = scores[0].sort()
        cumulative = torch.softmax(values, dim=-1).cumsum(dim=-1)
        near = (cumulative - (1 - top_p)).abs() <= reach
        near[-1] = False  # the most likely token is always kept
        near = torch.zeros_like(near).scatter(0, order, near)
        if bool(near[chosen]):
            return False
        contenders |= near
    contenders[chosen] = False
    if not bool(contenders.any()):
        return True
    race = torch.softmax(scores[0], dim=-1) / q[0]  # the ratios among any kept tokens, whatever the cut
    runner_up = float(race[contenders].max())
    return runner_up <= 0 or math.log(float(race[chosen]) / runner_up) > reach


class _RowLimits(StoppingCriteria):
    """Ends each row of a batched ``generate`` where ``generate_tokens`` would end it alone: at its own
    ``max_new_tokens``, at EOS, at the end of a turn (``stop_strings``: the template's ``end_of_turn``); ``ends[row]``
    is the length at which it ended (None while it runs)."""

    def __init__(self, limits: list[int], eos_token_id: int | None):
        self.limits = limits
        self.eos_token_id = eos_token_id
        self.stop_strings: StoppingCriteria | None = None
        self.ends: list[int | None] = [None] * len(limits)
        self.unsure: list[int | None] = [None] * len(limits)  # set by _RowSampler: such a row ends there

    def running(self, row: int) -> bool:
        """Whether ``row`` is still being generated (not ended, not given up as unsure)."""
        return self.ends[row] is None and self.unsure[row] is None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        length = input_ids.shape[1]
        done = torch.tensor(
            [length >= limit or unsure is not None for limit, unsure in zip(self.limits, self.unsure, strict=True)],
            device=input_ids.device,
        )
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
            end, unsure = self.limits.ends[row], self.limits.unsure[row]
            if unsure is not None and self.steps >= unsure:
                continue  # that token and what follows come from the row's lone run (_Resumed)
            if streamer is not None and (self.steps == 0 or end is None or self.steps <= end):
                streamer.put(value[row : row + 1])

    def end(self) -> None:
        for streamer, unsure in zip(self.streamers, self.limits.unsure, strict=True):
            if streamer is not None and unsure is None:  # an unsure row's streamer ends with its lone run
                streamer.end()


class _Resumed:
    """A row's streamer for the lone run that answers it again: it already has the prompt's ids and the reply's
    first ``skip`` tokens from the batch (the same as the lone run's), so those are not passed again."""

    def __init__(self, streamer: Any, skip: int):
        self.streamer = streamer
        self.skip = skip + 1  # and the prompt's ids, which generate() passes first

    def put(self, value: torch.Tensor) -> None:
        if self.skip > 0:
            self.skip -= 1
            return
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


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
