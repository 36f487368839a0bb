"""``anygpt serve``: the model behind an OpenAI-compatible HTTP API (``anygpt.apps.server`` has the routes and shapes).

    anygpt serve [--model NAME|DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--device cuda --dtype float16]
        [--max-batch-size 8] [--batch-wait-ms 10] [--queue-size 64] [--max-request-mb 64]
        [--max-videos 100] [--video-dir DIR] [--no-exact-batching]
    anygpt serve --replicas N [--min-replicas A --max-replicas B] [--gpus-per-replica 1]     (Ray Serve)

One process serves on loopback by default, with uvicorn; ``--replicas`` (or autoscaling bounds) runs the same app as
a Ray Serve deployment instead (``anygpt.apps.server.ray_serve``; the ``serve-ray`` extra).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

import uvicorn

from anygpt.apps.runtime_args import add_runtime_arguments, runtime_options
from anygpt.apps.server import ServerOptions, build_app
from anygpt.base.errors import UsageError
from anygpt.core.config import DEFAULT_MODEL
from anygpt.core.pipeline import AnyGPTPipeline

logger = logging.getLogger(__name__)

COMMANDS = {"serve": "serve a model over HTTP (OpenAI-compatible)"}

API_KEY_VARIABLE = "ANYGPT_API_KEY"


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The options of ``anygpt serve``."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name or saved folder (default {DEFAULT_MODEL})")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1/ routes (default: ${API_KEY_VARIABLE}, or no key)",
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests answered together (default 8)")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests (default 10)"
    )
    parser.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more get 429 (default 64)")
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body; more get 413")
    parser.add_argument("--feature-cache", type=int, default=64, help="media items whose encoder features are kept")
    parser.add_argument(
        "--default-modalities",
        default="auto",
        help="what a request without 'modalities' gets: auto (the model decides), or a comma list such as 'text' "
        "(text-only replies, for evaluation harnesses) or 'text,image'",
    )
    parser.add_argument(
        "--max-videos",
        type=int,
        default=100,
        help="/v1/videos jobs kept; past it the oldest finished ones are dropped with their MP4s (default 100)",
    )
    parser.add_argument(
        "--video-dir",
        default=None,
        help="where the server makes its private folder of /v1/videos MP4s, removed when it stops "
        "(default: the system's temporary folder)",
    )
    parser.add_argument(
        "--exact-batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer again alone a batched request whose token choice came within rounding of another, so every "
        "reply has the tokens of the request sent alone (default); --no-exact-batching keeps the batch's choice",
    )
    add_runtime_arguments(parser)
    ray = parser.add_argument_group("scale-out on Ray Serve (the serve-ray extra)")
    ray.add_argument("--replicas", type=int, default=None, help="serve N replicas of the app with Ray Serve")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling: the fewest replicas")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling: the most replicas")
    ray.add_argument(
        "--target-ongoing-requests", type=float, default=None, help="autoscaling: requests in flight per replica"
    )
    ray.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 with a CUDA --device, else 0")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0)
    ray.add_argument("--ray-address", default=None, help="a running Ray cluster ('auto'); default: start one here")


def server_options(args: argparse.Namespace) -> ServerOptions:
    """The ``ServerOptions`` of the parsed arguments (checked there)."""
    if args.max_request_mb <= 0:
        raise UsageError(f"--max-request-mb must be > 0, got {args.max_request_mb}")
    if args.batch_wait_ms < 0:
        raise UsageError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    return ServerOptions(
        model_name=args.served_model_name or str(args.model),
        api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        max_batch_size=args.max_batch_size,
        queue_size=args.queue_size,
        batch_wait_s=args.batch_wait_ms / 1000,
        max_request_bytes=max(1, int(args.max_request_mb * 2**20)),
        feature_cache_size=args.feature_cache,
        default_modalities=_modalities(args.default_modalities),
        max_videos=args.max_videos,
        video_dir=args.video_dir,
        exact_batching=args.exact_batching,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    options = server_options(args)
    runtime = runtime_options(args)
    if options.api_key is None and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who can reach it can use the model", args.host)
    if args.replicas is not None or args.min_replicas is not None or args.max_replicas is not None:
        from anygpt.apps.server import ray_serve  # ray is an optional extra: loaded only for --replicas

        gpus = args.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if runtime is not None and (runtime.device or "").startswith("cuda") else 0.0
        plan = ray_serve.ReplicaPlan(
            replicas=args.replicas or args.min_replicas or 1,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests,
            gpus_per_replica=gpus,
            cpus_per_replica=args.cpus_per_replica,
        )
        app = ray_serve.deployment_app(str(args.model), options, runtime, plan)
        ray_serve.serve_forever(app, host=args.host, port=args.port, address=args.ray_address)
        return 0
    pipe = AnyGPTPipeline.from_pretrained(args.model, runtime=runtime)
    uvicorn.run(build_app(pipe, options), host=args.host, port=args.port, log_level="info")
    return 0


def _modalities(value: str) -> tuple[str, ...] | None:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    return None if names in ((), ("auto",)) else names


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
