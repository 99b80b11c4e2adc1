"""Server settings: FLASHSTEP_* environment variables, overridden by `flashstep serve` flags.

`Settings` is read once (in `serve_main`, or by the caller of `create_app`) and injected into
the app; nothing else in `server/` reads the environment.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Dtype = Literal["float32", "float16", "bfloat16"]


class Settings(BaseSettings):
    """Everything the server can be told at start.

    Lists (`models`) may be given comma-separated: FLASHSTEP_MODELS=shapes-swiftbrush,shapes-teacher.
    """

    model_config = SettingsConfigDict(env_prefix="FLASHSTEP_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 only inside a container.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one (tests).")
    models_root: Path | None = Field(
        None,
        description="The only folder checkpoints may load from (besides the shipped models). Default: none.",
    )
    models: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Model names to load at start. Default: every shipped model and every one in models_root."
    )
    default_model: str | None = Field(None, description="Model used when a request names none. Default: shapes-instaflow when loaded, else the first loaded.")
    max_batch_size: int = Field(8, ge=1, le=256, description="Most images one forward pass may carry.")
    max_wait_ms: float = Field(10.0, ge=0, le=10_000, description="Longest a request waits for a batch to fill.")
    queue_limit: int = Field(256, ge=1, description="Most images waiting for a batch; past it, 429.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request still waiting after this gets 504.")
    admin_token: SecretStr | None = Field(None, description="Bearer token of the /admin routes; unset disables them.")
    attention_backend: str | None = Field(None, description="kernels attention backend (sdpa, triton, xformers, math).")
    device: str | None = Field(None, description="torch device for every model, e.g. cuda:0. Default: the engine's choice.")
    dtype: Dtype | None = Field(None, description="Weights dtype. Default: the engine's choice for the device.")
    warmup: bool = Field(True, description="Run one generation per model before reporting ready.")
    image_store_bytes: int = Field(
        256 * 2**20, ge=65536, description="Bytes of images kept for response_format=url (plus 1 KiB per image)."
    )
    image_store_client_share: float = Field(
        0.25, gt=0, le=1, description="Fraction of image_store_bytes one client (bearer token, else address) may hold."
    )
    image_store_dir: Path | None = Field(
        None, description="Folder of the url image store, shared by every process using it. Default: memory."
    )
    public_url: str | None = Field(
        None, description="scheme://host[:port][/prefix] image urls are built from. Default: forwarded or bind address."
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        [], description="Addresses or networks whose X-Forwarded-* headers are believed, comma-separated."
    )
    image_ttl_s: float = Field(600.0, gt=0, description="Seconds an image stays fetchable at its url.")
    graceful_shutdown_s: float = Field(60.0, ge=0, description="On SIGTERM, how long in-flight requests may take.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level of log lines written.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; past it, 413 before parsing.")
    body_read_timeout_s: float = Field(
        10.0, gt=0, description="A request body still arriving this long after its headers gets 408."
    )
    keep_alive_timeout_s: int = Field(5, ge=1, description="An idle keep-alive connection is closed after this.")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest request line plus headers; past it, uvicorn answers 400."
    )
    workers: int | None = Field(
        None, ge=0, le=64,
        description="Engine worker processes running inference (one per GPU; on a CPU, how many). "
        "0 runs inference in the HTTP process. Default: one per CUDA device, else 1.",
    )  # fmt: skip
    worker_threads: int | None = Field(
        None, ge=1, le=256, description="torch CPU threads per worker process. Default: the cores but one (the HTTP process's), shared out among the workers."
    )
    ray: bool = Field(False, description="Serve on Ray Serve (ingress and engine deployments) instead of one process tree.")
    ray_replicas: int = Field(1, ge=1, le=256, description="Ray Serve: engine replicas per model (the autoscaler's starting and minimum count).")
    ray_max_replicas: int | None = Field(
        None, ge=1, le=1024, description="Ray Serve: most engine replicas per model the autoscaler may run. Default: ray_replicas."
    )
    ray_address: str | None = Field(
        None, description="Ray Serve: address of the cluster to join (e.g. ray://head:10001 or auto). Default: start a local one."
    )
    ray_cpus_per_replica: float = Field(1.0, gt=0, description="Ray Serve: CPUs reserved per engine replica.")
    ray_gpus_per_replica: float = Field(0.0, ge=0, description="Ray Serve: GPUs reserved per engine replica.")
    malloc_mmap_threshold_bytes: int = Field(
        4 * 1024, ge=0, le=32 << 20,
        description="glibc: while a model loads, allocations above this get their own mapping, so an "
        "unloaded or swapped-out model gives its memory back; 0 leaves glibc's allocator alone.",
    )  # fmt: skip

    @field_validator("ray_max_replicas")
    @classmethod
    def _max_at_least_min(cls, value: int | None, info) -> int | None:
        replicas = info.data.get("ray_replicas", 1)
        if value is not None and value < replicas:
            raise ValueError(f"`ray_max_replicas` must be >= ray_replicas ({replicas}) but is {value}")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()] or None
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            value = [entry.strip() for entry in value.split(",") if entry.strip()]
        if isinstance(value, list):
            for entry in value:  # fail at start, not on the first forwarded request
                try:
                    ipaddress.ip_network(str(entry).strip(), strict=False)
                except ValueError:
                    raise ValueError(f"`trusted_proxies` entries must be IP addresses or networks but one is {entry!r}") from None
        return value

    @field_validator("public_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"`public_url` must be http(s)://host[:port][/prefix] with no query but is {value!r}")
        return value.rstrip("/")

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, value: str | None) -> str | None:
        try:
            from flashstep.kernels.backends import (
                AttentionBackend,  # light: loads neither triton nor xformers
            )
        except ImportError:
            return value  # no kernels package: the engine decides what the name means
        known = [b.value for b in AttentionBackend]
        if value is not None and value not in known:
            raise ValueError(f"`attention_backend` must be one of {known} but is {value!r}")
        return value

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        return None if value == "" else value
