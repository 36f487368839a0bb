"""``anygpt serve``'s batching and overhead, measured side by side in one run and reported as ratios.

    python benchmarks/bench_serve.py [--model tiny] [--clients 8 16] [--overhead-model toyworld] [--repeats 3] [--json]

1. Throughput: N concurrent clients each ask for one image (``modalities: ["text", "image"]``, their own prompt and
   seed) through HTTP, against a server batching up to N requests and against the same server with
   ``--max-batch-size 1``; the ratio of requests per second. The same at the pipeline level:
   ``pipe.run_batch(8 requests)`` against 8 ``pipe.run`` calls (the same tokens, checked), with where the time
   goes: the LLM's prefill, decoding steps and conditioning pass, the decoders, the rest.
2. Overhead: one request through HTTP (the ``openai`` client, JSON, base64 PNG) against the same ``pipe.run`` call
   at ``--overhead-model`` (default ``toyworld``): ``(http - direct) / direct``; and, less exposed to other work on
   the machine, each request's round trip minus the time of its own ``run_batch`` call in the server.

Each server is ``anygpt serve`` in a subprocess on a free loopback port; the clients and the direct calls run here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import torch

from anygpt import AnyGPTPipeline
from anygpt.core.request import GenerationRequest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(model: str, max_batch_size: int) -> Iterator[openai.OpenAI]:
    """``anygpt serve`` in a subprocess (its own interpreter: the clients here do not share its GIL); yields a
    client once ``/health`` answers."""
    port = _free_port()
    command = [sys.executable, "-m", "anygpt", "serve", "--model", model, "--served-model-name", "bench"]
    command += ["--port", str(port), "--max-batch-size", str(max_batch_size), "--queue-size", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as the direct calls
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {' '.join(command)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    finally:
        process.terminate()
        process.wait(60)


def _ask(client: openai.OpenAI, i: int, steps: int, max_tokens: int) -> None:
    reply = client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": f"draw picture number {i} " + "with detail " * (i % 4)}],
        modalities=["text", "image"],
        max_tokens=max_tokens,
        seed=i,
        extra_body={"num_inference_steps": steps},
    )
    assert reply.choices[0].message.content[1]["type"] == "image_url"


def throughput(model: str, clients: int, repeats: int, steps: int, tokens: int) -> dict[str, float]:
    """Requests per second of ``clients`` concurrent image requests against a server batching up to ``clients``
    and one with ``--max-batch-size 1`` (both up at once, their rounds alternating; median over ``repeats``)."""
    times: dict[int, list[float]] = {clients: [], 1: []}
    with serving(model, clients) as batched, serving(model, 1) as single, ThreadPoolExecutor(clients) as pool:
        servers = {clients: batched, 1: single}
        for client in servers.values():
            list(pool.map(lambda i, c=client: _ask(c, i, steps, tokens), range(2)))  # warm-up
        for _ in range(repeats):
            for size, client in servers.items():
                start = time.perf_counter()
                list(pool.map(lambda i, c=client: _ask(c, i, steps, tokens), range(clients)))
                times[size].append(time.perf_counter() - start)
    batched_rps = clients / statistics.median(times[clients])
    single_rps = clients / statistics.median(times[1])
    return {"batched_rps": batched_rps, "unbatched_rps": single_rps, "ratio": batched_rps / single_rps}


class _Clock:
    """Time spent in some methods of one pipeline instance (wrapped on the instance, removed on exit)."""

    def __init__(self, pipe: AnyGPTPipeline, parts: dict[str, list[str]]):
        self.pipe, self.parts, self.spent = pipe, parts, dict.fromkeys(parts, 0.0)

    def __enter__(self):
        for part, names in self.parts.items():
            for name in names:
                original = getattr(self.pipe, name)

                def timed(*args, _original=original, _part=part, **kwargs):
                    start = time.perf_counter()
                    try:
                        return _original(*args, **kwargs)
                    finally:
                        self.spent[_part] += time.perf_counter() - start

                setattr(self.pipe, name, timed)
        return self

    def __exit__(self, *exc):
        for names in self.parts.values():
            for name in names:
                delattr(self.pipe, name)


class _ForwardClock:
    """Time in the LLM's forward passes, by kind: ``prefill`` (no cache yet: the prompt), ``decode`` (one new token
    a row, with the cache) and ``conditioning`` (the reply's tokens again, with the prompt's cache, for the decoder
    conditioning); hooks on the causal LM under any peft wrapper."""

    def __init__(self, pipe: AnyGPTPipeline):
        self.spent = {"prefill": 0.0, "decode": 0.0, "conditioning": 0.0}
        self.counts = dict.fromkeys(self.spent, 0)
        # the causal LM itself (a peft wrapper answers hasattr for its attributes too, but generate runs the LM)
        self.module = next(m for m in pipe.model.language_model.modules() if "lm_head" in m._modules)
        self._handles: list = []
        self._started: list[tuple[str, float]] = []

    def _before(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        tokens = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        cache = kwargs.get("past_key_values")
        cached = cache is not None and cache.get_seq_length() > 0
        kind = "prefill" if not cached and tokens > 1 else "decode" if tokens == 1 else "conditioning"
        self._started.append((kind, time.perf_counter()))

    def _after(self, module, args, kwargs, output):
        kind, start = self._started.pop()
        self.spent[kind] += time.perf_counter() - start
        self.counts[kind] += 1

    def __enter__(self):
        self._handles = [
            self.module.register_forward_pre_hook(self._before, with_kwargs=True),
            self.module.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def pipeline_batch(pipe: AnyGPTPipeline, count: int, repeats: int, steps: int, tokens: int) -> dict[str, float]:
    """``run_batch(count requests)`` against ``count`` ``run`` calls, with where the time goes: the LLM's prefill,
    decoding steps and conditioning pass (``_ForwardClock``), the decoders, and the rest (media encoding, token
    bookkeeping, building inputs); shares of the last round."""
    requests = [
        GenerationRequest(
            f"draw picture number {i} " + "with detail " * (i % 4),
            modalities=["image"],
            seed=i,
            max_new_tokens=tokens,
            num_inference_steps=steps,
        )
        for i in range(count)
    ]
    pipe.run_batch(requests[:2])
    singles, batches = [], []
    single_parts = {"llm": ["_generate_reply", "signal_conditioning"], "decoders": ["_render"]}
    batch_parts = {"llm": ["_generate_batch"], "decoders": ["_render_batch"]}
    for _ in range(repeats):
        with _Clock(pipe, single_parts) as single_clock, _ForwardClock(pipe) as single_forwards:
            start = time.perf_counter()
            alone = [pipe.run(request, show_progress=False) for request in requests]
            singles.append(time.perf_counter() - start)
        with _Clock(pipe, batch_parts) as batch_clock, _ForwardClock(pipe) as batch_forwards:
            start = time.perf_counter()
            together = pipe.run_batch(requests)
            batches.append(time.perf_counter() - start)
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    single, batch = statistics.median(singles), statistics.median(batches)
    result = {"single_s": single, "batch_s": batch, "ratio": single / batch}
    for name, clock, forwards, total in (
        ("single", single_clock, single_forwards, singles[-1]),
        ("batch", batch_clock, batch_forwards, batches[-1]),
    ):
        result[f"{name}_llm_share"] = clock.spent["llm"] / total
        result[f"{name}_decoder_share"] = clock.spent["decoders"] / total
        for kind, spent in forwards.spent.items():
            result[f"{name}_{kind}_share"] = spent / total
            result[f"{name}_{kind}_calls"] = forwards.counts[kind]
    return result


def overhead(model: str, repeats: int, tokens: int) -> dict[str, float]:
    """One request through HTTP against the same ``pipe.run`` call here (median of alternating rounds)."""
    pipe = AnyGPTPipeline.from_pretrained(model)
    prompt = "draw a red circle"
    request = GenerationRequest(prompt, modalities=["image"], seed=0, max_new_tokens=tokens)
    direct, http = [], []
    with serving(model, 8) as client:

        def ask():
            return client.chat.completions.create(
                model="bench",
                messages=[{"role": "user", "content": prompt}],
                modalities=["text", "image"],
                max_tokens=tokens,
                seed=0,
            )

        ask()
        pipe.run(request, show_progress=False)
        for _ in range(repeats):
            start = time.perf_counter()
            reply = ask()
            http.append(time.perf_counter() - start)
            start = time.perf_counter()
            output = pipe.run(request, show_progress=False)
            direct.append(time.perf_counter() - start)
            assert reply.choices[0].message.content[0]["text"] == output.text
    d, h = statistics.median(direct), statistics.median(http)
    fastest = (min(http) - min(direct)) / min(direct)  # less exposed to other work on the machine
    return {"direct_s": d, "http_s": h, "overhead": (h - d) / d, "overhead_of_fastest": fastest, "rounds": repeats}


def overhead_outside_the_pipeline(model: str, repeats: int, tokens: int) -> dict[str, float]:
    """The server's own time per request: the app served in this process (uvicorn in a thread), each request's
    round trip through the ``openai`` client minus the time its ``run_batch`` call took in the worker (HTTP, JSON,
    validation, the queue, PNG and base64 encoding, the client's parsing). Unlike ``overhead``, whose two medians
    are far apart in time, both parts come from the same request, so other work on the machine cancels out."""
    import threading

    import uvicorn

    from anygpt.apps.server import ServerOptions, build_app

    pipe = AnyGPTPipeline.from_pretrained(model)
    inside: list[float] = []
    real = pipe.run_batch

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            inside.append(time.perf_counter() - start)

    pipe.run_batch = timed
    port = _free_port()
    app = build_app(pipe, ServerOptions(model_name="bench"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    outside, total = [], []
    try:
        for round_ in range(repeats + 1):
            inside.clear()
            start = time.perf_counter()
            client.chat.completions.create(
                model="bench",
                messages=[{"role": "user", "content": "draw a red circle"}],
                modalities=["text", "image"],
                max_tokens=tokens,
                seed=0,
            )
            spent = time.perf_counter() - start
            if round_:  # the first round warms up
                outside.append(spent - sum(inside))
                total.append(spent)
    finally:
        server.should_exit = True
        thread.join(30)
    return {
        "outside_ms": statistics.median(outside) * 1000,
        "outside_min_ms": min(outside) * 1000,
        "share": statistics.median(o / t for o, t in zip(outside, total, strict=True)),
        "total_ms": statistics.median(total) * 1000,
        "rounds": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument(
        "--clients", type=int, nargs="*", default=[8, 16], help="concurrent clients per round (none: no HTTP rounds)"
    )
    parser.add_argument("--overhead-model", default="toyworld")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overhead-repeats", type=int, default=5, help="rounds of the overhead measurement")
    parser.add_argument("--steps", type=int, default=None, help="decoder steps (default: the decoder's own)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in each server (default 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    pipe = AnyGPTPipeline.from_pretrained(args.model)
    steps = args.steps or pipe.decoders[next(iter(pipe.decoders))].config.num_inference_steps
    report: dict[str, dict] = {"throughput": {}}
    for clients in args.clients:
        report["throughput"][clients] = throughput(args.model, clients, args.repeats, steps, args.max_new_tokens)
    report["pipeline_batch_8"] = pipeline_batch(pipe, 8, args.repeats, steps, args.max_new_tokens)
    report["overhead"] = overhead(args.overhead_model, args.overhead_repeats, args.max_new_tokens)
    report["outside"] = overhead_outside_the_pipeline(args.overhead_model, args.overhead_repeats, args.max_new_tokens)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"model {args.model}, {steps} decoder steps, {args.max_new_tokens} new tokens, {args.threads} torch thread(s), "
        f"median of {args.repeats}"
    )
    for clients, row in report["throughput"].items():
        print(
            f"{clients:3d} concurrent image requests: batched {row['batched_rps']:.2f} req/s, "
            f"--max-batch-size 1 {row['unbatched_rps']:.2f} req/s, ratio {row['ratio']:.2f}x"
        )
    b = report["pipeline_batch_8"]
    print(f"run_batch(8) {b['batch_s']:.2f} s vs 8 x run {b['single_s']:.2f} s: {b['ratio']:.2f}x")
    for name in ("single", "batch"):
        forwards = ", ".join(
            f"{kind} {b[f'{name}_{kind}_share']:.0%} ({b[f'{name}_{kind}_calls']} forwards)"
            for kind in ("prefill", "decode", "conditioning")
        )
        print(
            f"  {'8 x run' if name == 'single' else 'run_batch'}: LLM {b[f'{name}_llm_share']:.0%} ({forwards}), "
            f"decoders {b[f'{name}_decoder_share']:.0%}, "
            f"rest {1 - b[f'{name}_llm_share'] - b[f'{name}_decoder_share']:.0%}"
        )
    o = report["overhead"]
    print(
        f"{args.overhead_model}: one request over HTTP {o['http_s'] * 1000:.0f} ms vs pipe.run "
        f"{o['direct_s'] * 1000:.0f} ms: overhead {o['overhead']:+.1%} (medians of {o['rounds']} alternating rounds; "
        f"of the fastest rounds {o['overhead_of_fastest']:+.1%})"
    )
    i = report["outside"]
    print(
        f"{args.overhead_model}: the server's own time per request (round trip minus its run_batch call, same "
        f"request): {i['outside_ms']:.1f} ms median, {i['outside_min_ms']:.1f} ms fastest, {i['share']:.1%} of a "
        f"{i['total_ms']:.0f} ms request ({i['rounds']} rounds)"
    )


if __name__ == "__main__":
    main()
