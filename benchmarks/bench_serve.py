"""``anygpt serve``'s batching and overhead, measured side by side in one run and reported as ratios.

    python benchmarks/bench_serve.py [--model tiny] [--clients 8 16] [--overhead-model toyworld] [--repeats 3] [--json]

1. Throughput: N concurrent clients each ask for one image (``modalities: ["text", "image"]``, their own prompt and
   seed) through HTTP, against a server batching up to N requests and against the same server with
   ``--max-batch-size 1``; the ratio of requests per second. The same at the pipeline level:
   ``pipe.run_batch(8 requests)`` against 8 ``pipe.run`` calls, with where the time goes (LLM, decoders, the rest).
2. Overhead: one request through HTTP (the ``openai`` client, JSON, base64 PNG) against the same ``pipe.run`` call
   at ``--overhead-model`` (default ``toyworld``): ``(http - direct) / direct``.

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


def pipeline_batch(pipe: AnyGPTPipeline, count: int, repeats: int, steps: int, tokens: int) -> dict[str, float]:
    """``run_batch(count requests)`` against ``count`` ``run`` calls, with the LLM and decoder shares."""
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
        with _Clock(pipe, single_parts) as single_clock:
            start = time.perf_counter()
            for request in requests:
                pipe.run(request, show_progress=False)
            singles.append(time.perf_counter() - start)
        with _Clock(pipe, batch_parts) as batch_clock:
            start = time.perf_counter()
            pipe.run_batch(requests)
            batches.append(time.perf_counter() - start)
    single, batch = statistics.median(singles), statistics.median(batches)
    return {
        "single_s": single,
        "batch_s": batch,
        "ratio": single / batch,
        "single_llm_share": single_clock.spent["llm"] / singles[-1],
        "single_decoder_share": single_clock.spent["decoders"] / singles[-1],
        "batch_llm_share": batch_clock.spent["llm"] / batches[-1],
        "batch_decoder_share": batch_clock.spent["decoders"] / batches[-1],
    }


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
    return {"direct_s": d, "http_s": h, "overhead": (h - d) / d}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--overhead-model", default="toyworld")
    parser.add_argument("--repeats", type=int, default=3)
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
    report["overhead"] = overhead(args.overhead_model, max(args.repeats, 5), args.max_new_tokens)
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
    print(
        f"run_batch(8) {b['batch_s']:.2f} s vs 8 x run {b['single_s']:.2f} s: {b['ratio']:.2f}x; "
        f"time in LLM / decoders: single {b['single_llm_share']:.0%} / {b['single_decoder_share']:.0%}, "
        f"batched {b['batch_llm_share']:.0%} / {b['batch_decoder_share']:.0%}"
    )
    o = report["overhead"]
    print(
        f"{args.overhead_model}: one request over HTTP {o['http_s'] * 1000:.0f} ms vs pipe.run "
        f"{o['direct_s'] * 1000:.0f} ms: overhead {o['overhead']:+.1%}"
    )


if __name__ == "__main__":
    main()
