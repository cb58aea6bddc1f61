"""``infer-plan serve``: the reference batching server."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..server.config import ServerConfig
from ..server.instances import run_instances
from ..server.keys import DEV_KEYS
from ..server.runner import Listening, run_server
from .options import (
    KernelOpt,
    MaxBatchOpt,
    MaxModelLenOpt,
    MaxTokensOpt,
    MaxWaitOpt,
    ProfileOpt,
    ScenarioOpt,
    TemperatureOpt,
    build_scenario,
    engine_options,
)


def serve(
    host: Annotated[str, typer.Option("--host", help="Public listener address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Public port (0: any free one).")] = 8000,
    backend: Annotated[
        str, typer.Option("--backend", help="sim | vllm | openai | package.module:Class (your own).")
    ] = "sim",
    gpus: Annotated[int | None, typer.Option("--gpus", min=1, help="GPU workers [scenario's, else 1].")] = None,
    keys: Annotated[Path | None, typer.Option("--keys", help="TOML [keys] table: key = tier.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name or local path.")] = None,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="Name clients send as 'model' [--model, else backend].")
    ] = None,
    upstream: Annotated[str | None, typer.Option("--upstream", help="OpenAI-compatible base URL.")] = None,
    max_tokens: MaxTokensOpt = 16,
    temperature: TemperatureOpt = 0.0,
    max_model_len: MaxModelLenOpt = 512,
    internal_host: Annotated[str, typer.Option("--internal-host", help="Internal listener address.")] = "127.0.0.1",
    internal_port: Annotated[
        int | None, typer.Option("--internal-port", min=0, max=65535, help="Internal port [port+1].")
    ] = None,
    allow_remote_internal: Annotated[
        bool, typer.Option("--allow-remote-internal", help="Let the internal API bind a non-loopback address.")
    ] = False,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", min=0, help="Seconds to drain on SIGTERM.")] = 30.0,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="JSON access log on stderr.")] = True,
    redis: Annotated[
        str | None, typer.Option("--redis", help="Share the tier queues with other instances in this Redis (URL).")
    ] = None,
    redis_prefix: Annotated[
        str, typer.Option("--redis-prefix", help="Key prefix in Redis: one deployment's queues.")
    ] = "infer-plan",
    instances: Annotated[
        int, typer.Option("--instances", min=1, help="Server processes sharing the ports (needs --redis when > 1).")
    ] = 1,
    max_batch: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    kernel_ms: KernelOpt = None,
    scenario: ScenarioOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Serve the batching design over HTTP: tier queues, dynamic batcher, GPU workers, 429 backpressure."""
    scen = build_scenario(
        scenario=scenario, profile=profile, gpus=gpus, max_batch=max_batch, max_wait_ms=max_wait_ms, kernel_ms=kernel_ms
    )
    options = engine_options(backend, model, upstream, max_tokens, temperature, max_model_len)
    config = ServerConfig(
        model=scen.model,
        host=host,
        port=port,
        internal_host=internal_host,
        internal_port=internal_port,
        allow_remote_internal=allow_remote_internal,
        backend=backend,
        backend_options=options,
        gpus=scen.model.gpus or 1,
        keys_file=keys,
        model_name=served_model_name or model,
        drain_timeout_s=drain_timeout,
        access_log=access_log,
        redis_url=redis,
        redis_prefix=redis_prefix,
    )
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    def announce(where: Listening) -> None:
        key_note = f"keys from {keys}" if keys else "development keys " + ", ".join(DEV_KEYS)
        shared = f", queues shared in {redis}" if redis else ""
        many = f"{instances} instances x " if instances > 1 else ""
        tiers = ", ".join(where.tiers)
        print(
            f"infer-plan serve: listening on {where.url} (internal {where.internal_url}); backend {backend}, "
            f"model {where.model_name!r}, {many}{config.gpus} GPU(s){shared}; {key_note} (tiers: {tiers})",
            flush=True,
        )

    if instances > 1:
        raise typer.Exit(run_instances(config, instances, announce))
    run_server(config, on_ready=announce)
