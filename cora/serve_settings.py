"""``cora serve``'s settings: one typed, validated record shared by the command line and the deployment.

:class:`ServeSettings` is built once (:func:`settings_from_args` for the CLI, or directly), checked in
``__post_init__`` and handed, frozen, to :func:`cora.serve.run` and to every replica. The pre-flight
checks that need the file system or the network (the checkpoint's digest and preprocessing record, the
float model's weights, the device, free ports) live here too, so that every refusal comes before Ray
is imported. No Ray here.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from .payloads import Limits, limits_for

__all__ = ["ServeSettings", "ModelSource", "ServeSettingsError", "settings_from_args", "check_port_free",
           "ray_environment"]


class ServeSettingsError(ValueError):
    """A ``cora serve`` setting that cannot work; the message is one line."""


@dataclass(frozen=True)
class ModelSource:
    """What the replicas load: a checkpoint path, or a float model by name (with optional weights / shared
    folder). Paths are absolute: the replicas may run in another working directory."""

    checkpoint: str | None = None
    float_model: str | None = None
    weights: str | None = None
    shared: str | None = None

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.float_model is None):
            raise ServeSettingsError("serve needs a CHECKPOINT or --float MODEL (one of them)")
        if self.checkpoint is not None and (self.weights is not None or self.shared is not None):
            raise ServeSettingsError("--weights and --shared are for --float; a checkpoint holds its own weights")

    def describe(self) -> str:
        return self.checkpoint or f"float {self.float_model}"


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``cora serve`` needs, checked once.

    Model: ``source``, ``preprocessing`` (the model's record: ``image_size``, ``resize_size``, ``mean``,
    ``std``, ``class_names``), ``device`` (``cpu`` / ``cuda``, resolved), ``dtype`` (resolved),
    ``deploy_weights``, ``top_k``. Batching: ``max_batch`` images per model call, ``batch_wait_s``.
    Replicas: ``replicas`` (fixed) or autoscaling between ``min_replicas`` and ``max_replicas`` aiming at
    ``target_ongoing`` requests per replica (all three set, or none); ``num_cpus``, ``gpus_per_replica``,
    ``num_threads`` (torch threads per replica), ``decode_threads`` (image decoding threads per replica).
    Backpressure (Ray Serve's): ``max_ongoing`` requests a replica holds at once, ``max_queued`` requests
    waiting at each Ray proxy / handle beyond that (then 503). ``limits``: one request's images and pixels.
    Ray: ``host``, ``port``, ``metrics_port`` (local Ray only), ``address`` (join a cluster),
    ``proxy_location`` (Serve's: ``EveryNode`` with a replica, or ``HeadOnly``), ``ready_timeout`` seconds.
    """

    source: ModelSource
    preprocessing: dict = field(hash=False)
    device: str = "cpu"
    dtype: str = "float32"
    deploy_weights: str = "auto"
    top_k: int = 5
    max_batch: int = 32
    batch_wait_s: float = 0.005
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing: float | None = None
    num_cpus: float = 1.0
    gpus_per_replica: float = 0.0
    num_threads: int = 1
    decode_threads: int = 2
    max_ongoing: int = 64
    max_queued: int = 64
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 8001
    address: str | None = None
    proxy_location: str = "EveryNode"
    ready_timeout: float = 600.0

    def __post_init__(self) -> None:
        _positive(self, "top_k", "max_batch", "replicas", "num_threads", "decode_threads", "max_ongoing",
                  "max_queued")
        if self.device not in ("cpu", "cuda"):
            raise ServeSettingsError(f"device must be cpu or cuda, got {self.device!r}")
        if self.batch_wait_s < 0 or self.num_cpus <= 0 or self.gpus_per_replica < 0 or self.ready_timeout <= 0:
            raise ServeSettingsError("batch wait, GPUs per replica must be >= 0; CPUs per replica, ready timeout > 0")
        if self.device == "cuda" and self.gpus_per_replica <= 0:
            raise ServeSettingsError("--device cuda needs --gpus-per-replica > 0 (Ray hides the GPUs from a replica "
                                     "that reserves none)")
        if self.device == "cpu" and self.gpus_per_replica > 0:
            raise ServeSettingsError("--gpus-per-replica is for --device cuda; a CPU replica reserves no GPU")
        if self.source.float_model is not None and self.deploy_weights != "auto":
            raise ServeSettingsError("--deploy-weights is for a checkpoint; a float model is served as it is")
        classes = self.preprocessing.get("class_names")
        if classes and self.top_k > len(classes):
            raise ServeSettingsError(f"--top-k {self.top_k} is more than the model's {len(classes)} classes")
        if self.max_ongoing < self.max_batch:
            raise ServeSettingsError(f"--max-ongoing {self.max_ongoing} is below --max-batch {self.max_batch}: "
                                     f"a batch could never fill up")
        self._check_autoscaling()
        if self.proxy_location not in ("EveryNode", "HeadOnly"):
            raise ServeSettingsError(f"proxy location must be EveryNode or HeadOnly, got {self.proxy_location!r}")
        if self.address is None and self.metrics_port == self.port:
            raise ServeSettingsError(f"--metrics-port and --port are both {self.port}")
        from PIL import Image

        bomb = Image.MAX_IMAGE_PIXELS
        if bomb is not None and self.limits.max_pixels > bomb:  # PIL would warn (process-wide) before our check
            raise ServeSettingsError(f"--max-pixels {self.limits.max_pixels} is over PIL's decompression-bomb "
                                     f"limit of {bomb}")

    def _check_autoscaling(self) -> None:
        auto = (self.min_replicas, self.max_replicas, self.target_ongoing)
        if all(v is None for v in auto):
            return
        if any(v is None for v in auto):
            raise ServeSettingsError("autoscaling needs --min-replicas, --max-replicas and --target-ongoing together")
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ServeSettingsError(f"--min-replicas {self.min_replicas} and --max-replicas {self.max_replicas}: "
                                     f"need 1 <= min <= max")
        if not 0 < self.target_ongoing <= self.max_ongoing:
            raise ServeSettingsError(f"--target-ongoing {self.target_ongoing:g} must be in (0, --max-ongoing "
                                     f"{self.max_ongoing}]")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    @property
    def most_replicas(self) -> int:
        """The largest replica count this deployment may reach (for reserving CPUs)."""
        return self.max_replicas if self.autoscaling else self.replicas


def ray_environment(settings: ServeSettings) -> dict:
    """Environment variables Ray must see before it is imported, for these settings.

    A local Ray (or a cluster reached on a loopback address) runs on 127.0.0.1: Ray's own switch
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it take the loopback address as the node's (Ray resolves
    ``127.0.0.1`` given to ``ray.init`` to the machine's address otherwise). A local Ray reports no usage
    statistics (``RAY_USAGE_STATS_ENABLED=0``). Values already in the environment win.
    """
    env = {}
    host = (settings.address or "").rsplit(":", 1)[0].strip("[]")
    if settings.address is None or host in ("127.0.0.1", "localhost", "::1"):
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if settings.address is None:
        env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ServeSettingsError(f"{name} must be a positive integer, got {value!r}")


def check_port_free(host: str, port: int, what: str) -> None:
    """Refuse a port something already listens on (Ray would fail later, less clearly)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ServeSettingsError(f"--host {host}: cannot resolve it ({exc})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise ServeSettingsError(f"{what} {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def _source_and_preprocessing(args) -> tuple[ModelSource, dict]:
    """The model the replicas load and its preprocessing record, read and checked here, before Ray starts."""
    if args.checkpoint is None and args.float_model is not None:
        from .zoo import load_float_model, preprocessing_for

        source = ModelSource(float_model=args.float_model,
                             weights=str(Path(args.weights).resolve()) if args.weights else None,
                             shared=str(Path(args.shared).resolve()) if args.shared else None)
        load_float_model(args.float_model, args.weights, args.shared)  # name, weights and shared folder, once
        return source, preprocessing_for(args.float_model)
    source = ModelSource(checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                         float_model=args.float_model, weights=args.weights, shared=args.shared)
    from .checkpoint import read_metadata

    path = Path(args.checkpoint)
    if path.is_dir():
        raise ServeSettingsError(f"{path} is a folder, not a checkpoint")
    meta = read_metadata(path)  # the whole file against its digest
    if meta.get("preprocessing") is None:
        raise ServeSettingsError(f"{path} records no preprocessing (image size, mean/std), so it cannot be served: "
                                 f"re-save it with cora.save(model, path, preprocessing=...)")
    if not isinstance(meta.get("architecture"), dict):
        raise ServeSettingsError(f"{path} records no architecture, so it cannot be rebuilt for serving")
    return source, meta["preprocessing"]


def _device(args, resolve_device) -> tuple[str, float]:
    if args.address:  # the GPUs are the cluster's, not necessarily this machine's
        device = args.device if args.device != "auto" else ("cuda" if (args.gpus_per_replica or 0) > 0 else "cpu")
    else:
        device = resolve_device(args.device).type
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if device == "cuda" else 0.0)
    if not args.address and device == "cuda" and gpus > 0:
        import torch

        have, most = torch.cuda.device_count(), args.max_replicas or args.replicas
        if gpus * most > have:
            raise ServeSettingsError(f"{most} replicas x --gpus-per-replica {gpus:g} needs {gpus * most:g} GPUs, "
                                     f"this machine has {have}")
    return device, gpus


def settings_from_args(args, resolve_device) -> ServeSettings:
    """The CLI's parsed ``serve`` arguments as checked :class:`ServeSettings` (raises :class:`ServeSettingsError`
    or the checkpoint reader's ``ValueError`` / ``OSError``, each one line). ``resolve_device``: the CLI's
    ``--device`` rule. Limits left unset (``None``) are sized for the model (:func:`cora.payloads.limits_for`)."""
    source, pre = _source_and_preprocessing(args)
    device, gpus = _device(args, resolve_device)
    sized = limits_for(int(pre.get("resize_size") or pre["image_size"]))
    max_pixels = args.max_pixels or sized.max_pixels
    limits = Limits(max_images=args.max_images or sized.max_images,
                    max_body_bytes=args.max_body_bytes or sized.max_body_bytes, max_pixels=max_pixels,
                    max_request_pixels=args.max_request_pixels or max(sized.max_request_pixels, max_pixels))
    settings = ServeSettings(
        source=source, preprocessing=pre, device=device,
        dtype=args.dtype if args.dtype != "auto" else ("float16" if device == "cuda" else "float32"),
        deploy_weights=args.deploy_weights, top_k=args.top_k, max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000.0, replicas=args.replicas, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, target_ongoing=args.target_ongoing, num_cpus=args.num_cpus,
        gpus_per_replica=gpus, num_threads=max(1, int(args.num_cpus)), decode_threads=args.decode_threads,
        max_ongoing=args.max_ongoing or 2 * args.max_batch, max_queued=args.max_queued, limits=limits,
        host=args.host, port=args.port, metrics_port=args.metrics_port, address=args.address,
        proxy_location=args.proxy_location, ready_timeout=args.ready_timeout)
    check_port_free(settings.host, settings.port, "--port")
    if settings.address is None:
        check_port_free("127.0.0.1", settings.metrics_port, "--metrics-port")
    return settings
