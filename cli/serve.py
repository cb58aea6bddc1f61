"""``infer-plan serve``: the reference batching server."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from ..core.errors import UsageError
from ..server.access.keys import DEV_KEYS
from ..server.config import ServerConfig

if TYPE_CHECKING:
    from ..server.runner import Listening
from .options import (
    BackendOpt,
    BackendOptionOpt,
    DeviceOpt,
    DtypeOpt,
    KernelOpt,
    KeysOpt,
    MaxBatchOpt,
    MaxModelLenOpt,
    MaxTokensOpt,
    MaxWaitOpt,
    ProfileOpt,
    RayAddressOpt,
    RayEngineOpt,
    RoutingOpt,
    ScenarioOpt,
    TemperatureOpt,
    TorchModelOpt,
    backend_options,
    build_scenario,
)

HostOpt = Annotated[str, typer.Option("--host", help="Public listener address.")]
PortOpt = Annotated[int, typer.Option("--port", min=0, max=65535, help="Public port (0: any free one).")]
GpusOpt = Annotated[int | None, typer.Option("--gpus", min=1, help="GPU workers (default: the scenario's, else 1).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Model name or local path.")]
ServedNameOpt = Annotated[
    str | None,
    typer.Option("--served-model-name", help="Name clients send as model (default: --model, else the backend's)."),
]
UpstreamOpt = Annotated[
    str | None,
    typer.Option("--upstream", help="OpenAI-compatible base URL; several, comma-separated: one GPU worker each."),
]
ReplicaCheckOpt = Annotated[
    float,
    typer.Option(
        "--replica-check-s", min=0.1,
        help="Seconds between probes of each engine replica (--backend openai; 3 failed in a row drain it).",
    ),
]  # fmt: skip
ProvisionOpt = Annotated[
    str | None,
    typer.Option(
        "--provision-command",
        help="With [service.autoscale] and --backend openai: a shell command that starts an engine replica "
        "(it registers at $INFER_PLAN_REGISTER_URL, or prints its base URL last).",
    ),
]
ReleaseOpt = Annotated[
    str | None,
    typer.Option(
        "--release-command", help="Run once a released replica is drained; its URL is $INFER_PLAN_REPLICA_URL."
    ),
]
InternalHostOpt = Annotated[str, typer.Option("--internal-host", help="Internal listener address.")]
InternalPortOpt = Annotated[
    int | None, typer.Option("--internal-port", min=0, max=65535, help="Internal port (default: port + 1).")
]
RemoteInternalOpt = Annotated[
    bool, typer.Option("--allow-remote-internal", help="Let the internal API bind a non-loopback address.")
]
DevKeysOpt = Annotated[
    bool,
    typer.Option("--allow-dev-keys", help="Accept the public development keys on a non-loopback --host (warns)."),
]
DrainOpt = Annotated[float, typer.Option("--drain-timeout", min=0, help="Seconds to drain on SIGTERM.")]
AccessLogOpt = Annotated[bool, typer.Option("--access-log/--no-access-log", help="JSON access log on stderr.")]
RedisOpt = Annotated[
    str | None, typer.Option("--redis", help="Share the tier queues with other instances in this Redis (URL).")
]
PrefixOpt = Annotated[str, typer.Option("--redis-prefix", help="Key prefix in Redis: one deployment's queues.")]
InstancesOpt = Annotated[
    int, typer.Option("--instances", min=1, help="Server processes sharing the ports (needs --redis when > 1).")
]


def serve(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    backend: BackendOpt = "sim",
    backend_option: BackendOptionOpt = None,
    gpus: GpusOpt = None,
    keys: KeysOpt = None,
    model: ModelOpt = None,
    served_model_name: ServedNameOpt = None,
    upstream: UpstreamOpt = None,
    replica_check_s: ReplicaCheckOpt = 5.0,
    provision_command: ProvisionOpt = None,
    release_command: ReleaseOpt = None,
    max_tokens: MaxTokensOpt = 16,
    temperature: TemperatureOpt = 0.0,
    max_model_len: MaxModelLenOpt = 512,
    torch_model: TorchModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
    ray_address: RayAddressOpt = None,
    ray_engine: RayEngineOpt = "sim",
    internal_host: InternalHostOpt = "127.0.0.1",
    internal_port: InternalPortOpt = None,
    allow_remote_internal: RemoteInternalOpt = False,
    allow_dev_keys: DevKeysOpt = False,
    drain_timeout: DrainOpt = 30.0,
    access_log: AccessLogOpt = True,
    redis: RedisOpt = None,
    redis_prefix: PrefixOpt = "infer-plan",
    instances: InstancesOpt = 1,
    max_batch: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    kernel_ms: KernelOpt = None,
    scenario: ScenarioOpt = None,
    profile: ProfileOpt = None,
    routing: RoutingOpt = None,
) -> None:
    """Serve the batching design over HTTP: tier queues, dynamic batcher, GPU workers, 429 backpressure."""
    if instances > 1 and redis is None:
        raise UsageError("--instances > 1 needs --redis URL: the instances share their queues there")
    if gpus is None and backend == "openai" and upstream and "," in upstream:
        from ..server.backends.openai_upstream import upstream_replicas

        gpus = len(upstream_replicas(upstream))  # one GPU worker per engine replica
    scen = build_scenario(
        scenario=scenario, profile=profile, gpus=gpus, max_batch=max_batch, max_wait_ms=max_wait_ms,
        kernel_ms=kernel_ms, routing=routing,
    )  # fmt: skip
    config = ServerConfig(
        model=scen.model, host=host, port=port, internal_host=internal_host, internal_port=internal_port,
        allow_remote_internal=allow_remote_internal, backend=backend, gpus=scen.model.gpus or 1,
        backend_options=backend_options(
            backend, backend_option, model=model, upstream=upstream, max_tokens=max_tokens, temperature=temperature,
            max_model_len=max_model_len, torch_model=torch_model, device=device, dtype=dtype, ray_address=ray_address,
            ray_engine=ray_engine, gpus=scen.model.gpus or 1,
        ),
        keys_file=keys, allow_dev_keys=allow_dev_keys, model_name=served_model_name or model,
        drain_timeout_s=drain_timeout, access_log=access_log, redis_url=redis, redis_prefix=redis_prefix,
        replica_check_s=replica_check_s, provision_command=provision_command, release_command=release_command,
    )  # fmt: skip
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if instances > 1:
        from ..server.instances import (
            run_instances,  # the server stack loads only for `serve`: others start faster
        )

        raise typer.Exit(run_instances(config, instances, _announcer(config, instances)))
    from ..server.runner import run_server

    run_server(config, on_ready=_announcer(config, instances))


def _announcer(config: ServerConfig, instances: int) -> Callable[[Listening], None]:
    """The start-up line: where it listens and what it serves (tests and tools read the URLs from it)."""
    key_note = f"keys from {config.keys_file}" if config.keys_file else "development keys " + ", ".join(DEV_KEYS)
    shared = f", queues shared in {config.redis_url}" if config.redis_url else ""
    many = f"{instances} instances x " if instances > 1 else ""

    def announce(where: Listening) -> None:
        print(
            f"infer-plan serve: listening on {where.url} (internal {where.internal_url}); backend {config.backend}, "
            f"model {where.model_name!r}, {many}{config.gpus} GPU(s){shared}; {key_note} "
            f"(tiers: {', '.join(where.tiers)})",
            flush=True,
        )

    return announce
