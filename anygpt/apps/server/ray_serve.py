"""The same app on Ray Serve: a deployment with replicas, autoscaling bounds and per-replica resources.

Each replica loads its own pipeline and runs ``build_app`` with its own batch worker, so one replica is one
``anygpt serve``; Ray's proxy spreads requests over them. Needs the ``serve-ray`` extra (``pip install
'anygpt[serve-ray]'``).

    anygpt serve --model toyworld --replicas 2                         # a local Ray instance, 2 CPU replicas
    anygpt serve --model toyworld --device cuda --replicas 4 --gpus-per-replica 1    # one GPU per replica
    anygpt serve --model toyworld --device cuda --min-replicas 1 --max-replicas 8 --gpus-per-replica 1
    serve run anygpt.apps.server.ray_serve:app_builder model=toyworld replicas=2 device=cuda gpus_per_replica=1

A multi-GPU node: ``--gpus-per-replica 1`` gives each replica one GPU (Ray sets its ``CUDA_VISIBLE_DEVICES``, so
``--device cuda`` is that GPU); N GPUs hold N replicas (``--gpus-per-replica 0.5``: two small models per GPU). A
cluster: ``ray start --head`` on one node and ``ray start --address HEAD:6379`` on the others, then
``anygpt serve ... --ray-address auto`` (or ``serve run``) on the head: replicas are placed on any node with a free
GPU, and autoscaling (``--min-replicas`` / ``--max-replicas``) adds replicas while each has more than
``--target-ongoing-requests`` requests in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import ray  # the serve-ray extra: imported only when Ray Serve is asked for
from ray import serve

from anygpt.apps.server.app import ServerOptions, build_app
from anygpt.base.errors import UsageError
from anygpt.core.pipeline import AnyGPTPipeline
from anygpt.core.runtime import RuntimeOptions

logger = logging.getLogger(__name__)

__all__ = ["AnyGPTDeployment", "ReplicaPlan", "app_builder", "deployment_app", "start"]

DEPLOYMENT_NAME = "anygpt"


@serve.ingress()
class AnyGPTDeployment:
    """One replica: its own pipeline (``from_pretrained(model, runtime=...)``) behind ``build_app``."""

    def __init__(self, model: str, options: dict[str, Any], runtime: dict[str, Any] | None):
        placement = RuntimeOptions(**runtime) if runtime else None
        self.pipe = AnyGPTPipeline.from_pretrained(model, runtime=placement)
        self.options = ServerOptions(**options)
        self.server_app = None  # (Ray's wrapper owns `app`)

    def __serve_build_asgi_app__(self):
        self.server_app = build_app(self.pipe, self.options)
        return self.server_app

    def check_health(self) -> None:
        """Ray Serve's health check: the replica is unhealthy once its worker thread has stopped."""
        worker = None if self.server_app is None else self.server_app.state.worker
        if worker is not None and worker.started and not worker.running:
            raise RuntimeError("the batch worker has stopped")


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas and what each one gets.

    Args:
        replicas: the replica count (the initial count with autoscaling).
        min_replicas, max_replicas: autoscaling bounds; both None: a fixed count.
        target_ongoing_requests: autoscaling adds replicas while each has more requests in flight than this
            (default: the server's ``max_batch_size``).
        gpus_per_replica, cpus_per_replica: Ray resources of each replica (fractions allowed).
    """

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise UsageError(f"replicas must be >= 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise UsageError("autoscaling needs both --min-replicas and --max-replicas")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.replicas <= self.max_replicas:
            raise UsageError(
                "autoscaling bounds: expected 0 <= min_replicas <= replicas <= max_replicas, got "
                f"{self.min_replicas} <= {self.replicas} <= {self.max_replicas}"
            )
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise UsageError("gpus_per_replica and cpus_per_replica must be >= 0")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    def deployment_options(self, options: ServerOptions) -> dict[str, Any]:
        """``serve.deployment`` keyword arguments: replicas or autoscaling, resources, and how many requests a
        replica takes at once (its batch and its queue, so that its own worker batches them)."""
        result: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": options.max_batch_size + options.queue_size,
        }
        if self.autoscaling:
            result["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or options.max_batch_size,
            }
        else:
            result["num_replicas"] = self.replicas
        return result


def deployment_app(model: str, options: ServerOptions, runtime: RuntimeOptions | None, plan: ReplicaPlan):
    """The Ray Serve application (``serve.run`` it, or return it from a ``serve run`` builder)."""
    deployment = serve.deployment(AnyGPTDeployment, **plan.deployment_options(options))
    runtime_fields = None if runtime is None else dataclasses.asdict(runtime)
    return deployment.bind(model, dataclasses.asdict(options), runtime_fields)


_PLAN_FIELDS = {f.name: f.type for f in dataclasses.fields(ReplicaPlan)}
_OPTION_FIELDS = {f.name: f.type for f in dataclasses.fields(ServerOptions)}
_RUNTIME_FIELDS = {f.name: f.type for f in dataclasses.fields(RuntimeOptions)}


def app_builder(args: dict[str, str]) -> Any:
    """The ``serve run`` target: ``serve run anygpt.apps.server.ray_serve:app_builder model=toyworld replicas=2``.

    Keys: ``model`` (default ``toyworld``), ``served_model_name``; ``ServerOptions`` fields (``api_key``,
    ``max_batch_size``, ``queue_size``, ``batch_wait_s``, ``max_request_bytes``, ``feature_cache_size``,
    ``default_modalities``, ``max_videos``, ``video_dir``, ``exact_batching``);
    ``ReplicaPlan`` fields (``replicas``, ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``,
    ``gpus_per_replica``, ``cpus_per_replica``); ``RuntimeOptions`` fields (``device``, ``dtype``, ``offload``,
    ``quantize``, ``quantization_backend``, ``compile``).

    Raises:
        UsageError: an unknown key (listing the known ones) or a bad value.
    """
    values = dict(args)
    model = values.pop("model", "toyworld")
    name = values.pop("served_model_name", model)
    known = {"model", "served_model_name", *_PLAN_FIELDS, *_OPTION_FIELDS, *_RUNTIME_FIELDS} - {"model_name"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"app_builder: unknown keys {unknown}; known: {sorted(known)}")
    plan = ReplicaPlan(**{k: _convert(k, v, _PLAN_FIELDS[k]) for k, v in values.items() if k in _PLAN_FIELDS})
    options = ServerOptions(
        model_name=name, **{k: _convert(k, v, _OPTION_FIELDS[k]) for k, v in values.items() if k in _OPTION_FIELDS}
    )
    runtime_values = {k: _convert(k, v, _RUNTIME_FIELDS[k]) for k, v in values.items() if k in _RUNTIME_FIELDS}
    runtime = RuntimeOptions(**runtime_values) if runtime_values else None
    return deployment_app(model, options, runtime, plan)


def _convert(key: str, value: Any, kind: Any) -> Any:
    """A ``serve run`` argument (a string) as the field's type."""
    if not isinstance(value, str):
        return value
    kind = str(kind)
    try:
        if kind.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("tuple"):
            return tuple(name.strip() for name in value.split(",") if name.strip())
    except ValueError:
        raise UsageError(f"app_builder: {key} expects {kind}, got {value!r}") from None
    if "None" in kind and value.lower() == "none":
        return None
    return value


def start(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
) -> None:
    """Connect to Ray (``address``; None: start a local instance with ``num_cpus`` / ``num_gpus``), start Serve's
    HTTP proxy on ``host:port`` and deploy ``app`` under ``/``; returns once every replica is up."""
    if not ray.is_initialized():
        local = {} if address is not None else {"num_cpus": num_cpus, "num_gpus": num_gpus}
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **local)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=DEPLOYMENT_NAME, route_prefix="/", blocking=False)


def serve_forever(app: Any, **kwargs: Any) -> None:
    """``start``, then wait until interrupted (Ctrl-C or SIGTERM): the application is deleted and this process's
    Ray connection closed (a local Ray instance started here stops with it)."""
    start(app, **kwargs)
    logger.info("anygpt is served by Ray Serve on http://%s:%s", kwargs.get("host"), kwargs.get("port"))
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)  # docker stop, systemd: end as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.delete(DEPLOYMENT_NAME)
        ray.shutdown()


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
