"""Load check of the chat demo: N ``gradio_client`` users send one message each at the same moment, on loopback.

    python benchmarks/bench_app.py [--clients 8] [--modalities image] [--max-new-tokens 16] [--url http://127.0.0.1:PORT/]
                                   [--device cuda --dtype bfloat16]

Without ``--url`` the demo is started in this process on a free loopback port (tiny model, a temporary output
folder). Every client is its own session; the queue runs one model call at a time, so the requests complete one
after another and none may fail. Prints N, how many completed with a valid answer, the wall time, and per-request
latencies. Only loopback addresses are accepted; each request has a time limit, so the check always ends.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from anygpt.apps.runtime_args import add_runtime_arguments, runtime_options
from anygpt.base.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _start_app(model: str, output_dir: Path, queue_size: int, runtime=None):
    import os

    spec = importlib.util.spec_from_file_location("anygpt_app", REPO / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    os.environ.update(app.gradio_environment(output_dir))
    from anygpt.apps.chat import ChatEngine

    engine = ChatEngine.from_pretrained(model, output_dir, runtime=runtime)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = app.serve(engine, port=port, queue_size=queue_size, prevent_thread_lock=True)
    return demo, f"http://127.0.0.1:{port}/"


def _one_user(url: str, index: int, args: argparse.Namespace, results: list) -> None:
    from gradio_client import Client

    start = time.perf_counter()
    try:
        client = Client(url, verbose=False, download_files=args.download_dir)
        job = client.submit(
            message={"text": f"user {index}: draw something", "files": []},
            outputs=args.modalities.split(",") if args.modalities else [],
            max_new_tokens=args.max_new_tokens,
            seed=index,
            api_name="/chat",
        )
        history, _, status = job.result(timeout=args.timeout)
        content = history[-1]["content"]
        files = [item for item in content if item.get("type") == "file"]
        wanted = len(args.modalities.split(",")) if args.modalities else 0
        ok = status.startswith("done") and len(files) == wanted
        results[index] = {"ok": ok, "seconds": time.perf_counter() - start, "status": status}
    except Exception as error:  # a failed request is what this check counts
        results[index] = {"ok": False, "seconds": time.perf_counter() - start, "status": f"{type(error).__name__}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent users N")
    parser.add_argument("--modalities", default="image", help="forced outputs per request ('' for text only)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--url", default=None, help="a running demo on loopback (default: start one here)")
    parser.add_argument("--queue-size", type=int, default=16, help="queue size of the demo started here")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--json", action="store_true")
    add_runtime_arguments(parser)  # --device --dtype ... of the demo started here
    args = parser.parse_args()
    if args.url is not None and not _loopback(args.url):
        sys.exit("bench_app: --url must be a loopback address (127.0.0.0/8, ::1 or localhost)")
    try:
        runtime = runtime_options(args)
    except UsageError as error:
        sys.exit(f"bench_app: {error}")

    with tempfile.TemporaryDirectory(prefix="anygpt-bench-app-") as tmp:
        args.download_dir = str(Path(tmp) / "downloads")
        start_here = (args.model, Path(tmp) / "out", args.queue_size, runtime)
        demo, url = (None, args.url) if args.url else _start_app(*start_here)
        results: list = [None] * args.clients
        threads = [threading.Thread(target=_one_user, args=(url, i, args, results)) for i in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.timeout + 60)
        wall = time.perf_counter() - start
        if demo is not None:
            demo.close()

    done = [r for r in results if r and r["ok"]]
    latencies = sorted(r["seconds"] for r in results if r)
    report = {
        "clients": args.clients,
        "completed": len(done),
        "wall_seconds": round(wall, 2),
        "latency_median_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_max_s": round(max(latencies), 2) if latencies else None,
        "modalities": args.modalities,
        "max_new_tokens": args.max_new_tokens,
        "failures": sorted({r["status"] for r in results if r and not r["ok"]}),
    }
    if args.json:
        print(json.dumps(report))
    else:
        n, completed, wall_s = report["clients"], report["completed"], report["wall_seconds"]
        print(f"N={n} concurrent requests: {completed} completed in {wall_s} s")
        print(f"latency median {report['latency_median_s']} s, max {report['latency_max_s']} s")
        if report["failures"]:
            print(f"failures: {report['failures']}")
    sys.exit(0 if len(done) == args.clients else 1)


if __name__ == "__main__":
    main()
