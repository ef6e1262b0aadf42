"""The gateway's knobs (defaults for tests; from_env() takes them from Django settings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GatewaySettings:
    health_interval_s: float = 2.0  # PLATFORM_GATEWAY_HEALTH_INTERVAL_MS
    health_timeout_s: float = 2.0  # PLATFORM_GATEWAY_HEALTH_TIMEOUT_MS
    health_persist_s: float = 10.0  # how often health is written to Backend rows (admin)
    connect_timeout_s: float = 2.0  # PLATFORM_GATEWAY_CONNECT_TIMEOUT_MS
    read_timeout_s: float = 300.0  # PLATFORM_GATEWAY_READ_TIMEOUT_S: max silence between two backend bytes
    queue_timeout_s: float = 30.0  # PLATFORM_QUEUE_TIMEOUT_S: max wait for a scheduler slot
    max_body_bytes: int = 1_048_576  # PLATFORM_GATEWAY_MAX_BODY_BYTES
    config_poll_s: float = 0.5  # PLATFORM_GATEWAY_CONFIG_POLL_MS
    metrics_token: str = ""  # PLATFORM_METRICS_TOKEN: bearer for /metrics; unset = loopback only
    metrics_top_tenants: int = 20  # PLATFORM_GATEWAY_METRICS_TENANTS: tenants with their own label
    ledger_spool_dir: Path | None = None  # PLATFORM_LEDGER_SPOOL_DIR; None (tests' default): no spool
    ledger_replay_interval_s: float = 10.0  # PLATFORM_LEDGER_REPLAY_INTERVAL_S
    journal_dir: Path | None = None  # PLATFORM_GATEWAY_JOURNAL_DIR; None (tests' default): no request journal

    @classmethod
    def from_env(cls) -> "GatewaySettings":
        """From Django settings (portal/settings.py reads the environment; docs/configuration.md lists it)."""
        from django.conf import settings as s

        return cls(
            health_interval_s=s.PLATFORM_GATEWAY_HEALTH_INTERVAL_MS / 1000,
            health_timeout_s=s.PLATFORM_GATEWAY_HEALTH_TIMEOUT_MS / 1000,
            connect_timeout_s=s.PLATFORM_GATEWAY_CONNECT_TIMEOUT_MS / 1000,
            read_timeout_s=float(s.PLATFORM_GATEWAY_READ_TIMEOUT_S),
            queue_timeout_s=float(s.PLATFORM_QUEUE_TIMEOUT_S),
            max_body_bytes=s.PLATFORM_GATEWAY_MAX_BODY_BYTES,
            config_poll_s=s.PLATFORM_GATEWAY_CONFIG_POLL_MS / 1000,
            metrics_token=s.PLATFORM_METRICS_TOKEN,
            metrics_top_tenants=s.PLATFORM_GATEWAY_METRICS_TENANTS,
            ledger_spool_dir=s.PLATFORM_LEDGER_SPOOL_DIR,
            ledger_replay_interval_s=float(s.PLATFORM_LEDGER_REPLAY_INTERVAL_S),
            journal_dir=s.PLATFORM_GATEWAY_JOURNAL_DIR,
        )
