"""Prometheus metrics of the gateway (its own registry, served at /metrics).

Tenant labels are bounded: the first N tenants seen (PLATFORM_GATEWAY_METRICS_TENANTS) get their slug,
every other tenant is counted as "other", so a platform with many tenants cannot blow up the series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter("gateway_requests_total", "Inference requests by endpoint and HTTP status.", ["endpoint", "status", "tenant"], registry=REGISTRY)
TOKENS_IN = Counter("gateway_input_tokens_total", "Prompt tokens (system prompt included).", ["tenant"], registry=REGISTRY)
TOKENS_OUT = Counter("gateway_output_tokens_total", "Tokens delivered to clients.", ["tenant"], registry=REGISTRY)
LATENCY = Histogram("gateway_request_duration_seconds", "Time from request to last byte.", ["endpoint"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
TTFT = Histogram("gateway_time_to_first_token_seconds", "Time from request to the first token from the backend.", ["endpoint"], registry=REGISTRY,
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BACKEND_HEALTHY = Gauge("gateway_backend_healthy", "1 when the backend is in rotation.", ["pool", "backend"], registry=REGISTRY)
BACKEND_IN_FLIGHT = Gauge("gateway_backend_in_flight", "Requests in flight per backend.", ["pool", "backend"], registry=REGISTRY)
LEDGER_FAILURES = Gauge("gateway_ledger_unwritten_records", "Usage records neither written nor spooled: lost to billing (logged in full).",
                        registry=REGISTRY)
LEDGER_SPOOLED = Gauge("gateway_ledger_spooled_records", "Usage records in this process's spool, waiting for the database.", registry=REGISTRY)


class TenantLabels:
    def __init__(self, limit: int):
        self.limit = limit
        self.known: set[str] = set()

    def __call__(self, slug: str | None) -> str:
        if not slug:
            return "none"
        if slug in self.known:
            return slug
        if len(self.known) < self.limit:
            self.known.add(slug)
            return slug
        return "other"


def render(snapshot, health, ledger) -> bytes:
    # The backends of the current snapshot only: one disabled or deleted since must not keep reporting its last value.
    BACKEND_HEALTHY.clear()
    BACKEND_IN_FLIGHT.clear()
    if snapshot is not None:
        for pool in snapshot.pools.values():
            for b in pool.backends:
                st = health.state(b.id)
                BACKEND_HEALTHY.labels(pool.name, b.url).set(1 if st.healthy else 0)
                BACKEND_IN_FLIGHT.labels(pool.name, b.url).set(st.in_flight)
    LEDGER_FAILURES.set(ledger.failures)
    LEDGER_SPOOLED.set(ledger.spooled)
    return generate_latest(REGISTRY)
