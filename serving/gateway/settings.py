"""The gateway's knobs, read from the environment through portal.env (the one settings reader)."""

from __future__ import annotations

from dataclasses import dataclass

from portal.env import env_int, env_str


@dataclass(frozen=True)
class GatewaySettings:
    health_interval_s: float = 2.0  # PLATFORM_GATEWAY_HEALTH_INTERVAL_MS
    health_timeout_s: float = 2.0  # PLATFORM_GATEWAY_HEALTH_TIMEOUT_MS
    health_persist_s: float = 10.0  # how often health is written to Backend rows (admin)
    connect_timeout_s: float = 2.0  # PLATFORM_GATEWAY_CONNECT_TIMEOUT_MS
    read_timeout_s: float = 300.0  # PLATFORM_GATEWAY_READ_TIMEOUT_S: max silence between two backend bytes
    queue_timeout_s: float = 30.0  # PLATFORM_GATEWAY_QUEUE_TIMEOUT_S: max wait for a scheduler slot
    max_body_bytes: int = 1_048_576  # PLATFORM_GATEWAY_MAX_BODY_BYTES
    config_poll_s: float = 0.5  # PLATFORM_GATEWAY_CONFIG_POLL_MS
    metrics_token: str = ""  # PLATFORM_METRICS_TOKEN: bearer for /metrics; unset = loopback only
    metrics_top_tenants: int = 20  # PLATFORM_GATEWAY_METRICS_TENANTS: tenants with their own label

    @classmethod
    def from_env(cls) -> "GatewaySettings":
        return cls(
            health_interval_s=env_int("PLATFORM_GATEWAY_HEALTH_INTERVAL_MS", 2000, minimum=50) / 1000,
            health_timeout_s=env_int("PLATFORM_GATEWAY_HEALTH_TIMEOUT_MS", 2000, minimum=50) / 1000,
            connect_timeout_s=env_int("PLATFORM_GATEWAY_CONNECT_TIMEOUT_MS", 2000, minimum=50) / 1000,
            read_timeout_s=float(env_int("PLATFORM_GATEWAY_READ_TIMEOUT_S", 300, minimum=1)),
            queue_timeout_s=float(env_int("PLATFORM_GATEWAY_QUEUE_TIMEOUT_S", 30, minimum=1)),
            max_body_bytes=env_int("PLATFORM_GATEWAY_MAX_BODY_BYTES", 1_048_576, minimum=1024),
            config_poll_s=env_int("PLATFORM_GATEWAY_CONFIG_POLL_MS", 500, minimum=50) / 1000,
            metrics_token=env_str("PLATFORM_METRICS_TOKEN"),
            metrics_top_tenants=env_int("PLATFORM_GATEWAY_METRICS_TENANTS", 20, minimum=0),
        )
