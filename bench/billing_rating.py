"""Benchmark billing: generate a usage ledger in SQL, time rating, a period close and the console pages.

Runs in a throwaway test database (created and dropped, like the test runner does), so it never touches
real data. PostgreSQL (the target, via DATABASE_URL) fills the ledger with generate_series; SQLite with a
recursive CTE.

    DATABASE_URL=postgres://… .venv/bin/python bench/billing_rating.py --rows 10000000 --tenants 1000
    .venv/bin/python bench/billing_rating.py            # small, SQLite
    add --write-docs to append the results to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date, datetime, timezone as dt_timezone
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import setup_databases, setup_test_environment, teardown_databases  # noqa: E402

PERIOD = date(2026, 1, 1)
DAYS = 31


def generate_ledger(rows: int, tenant_ids: list[int], pool_id: int) -> None:
    """`rows` ledger rows spread evenly over January 2026 and over the tenants, written by the database."""
    first, n_t = tenant_ids[0], len(tenant_ids)
    start = datetime(2026, 1, 1, tzinfo=dt_timezone.utc)
    step_s = DAYS * 86400 / rows
    with connection.cursor() as cur:
        if connection.vendor == "postgresql":
            cur.execute(
                """
                INSERT INTO serving_usagerecord (tenant_id, request_id, endpoint, model, adapter, pool_id, input_tokens,
                    output_tokens, status, duration_ms, created_at)
                SELECT %s + (i %% %s), 'bench-' || i, 'chat', CASE WHEN i %% 3 = 0 THEN 'bench-big' ELSE 'bench-tiny' END,
                    '', %s, 100 + (i %% 900), 20 + (i %% 300), CASE WHEN i %% 53 = 0 THEN 'error' ELSE 'ok' END, i %% 2000,
                    %s::timestamptz + (i * %s) * interval '1 second'
                FROM generate_series(0, %s - 1) AS i
                """,
                [first, n_t, pool_id, start, step_s, rows],
            )
        else:
            cur.execute(
                """
                WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < %s)
                INSERT INTO serving_usagerecord (tenant_id, request_id, endpoint, model, adapter, pool_id, input_tokens,
                    output_tokens, status, duration_ms, created_at)
                SELECT %s + (i %% %s), 'bench-' || i, 'chat', CASE WHEN i %% 3 = 0 THEN 'bench-big' ELSE 'bench-tiny' END,
                    '', %s, 100 + (i %% 900), 20 + (i %% 300), CASE WHEN i %% 53 = 0 THEN 'error' ELSE 'ok' END, i %% 2000,
                    strftime('%%Y-%%m-%%d %%H:%%M:%%f', '2026-01-01', '+' || CAST(i * %s AS TEXT) || ' seconds')
                FROM seq
                """,
                [rows, first, n_t, pool_id, step_s],
            )


def run(rows: int, tenants: int) -> list[tuple[str, float, str]]:
    from django.contrib.auth import get_user_model
    from django.test import Client

    from billing import invoicing, rating
    from billing.models import Invoice, Price
    from serving.models import Backend, BackendPool, BaseModel
    from tenants.models import Membership, Role, Tenant

    tiny = BaseModel.objects.create(name="bench-tiny", hf_id="bench/tiny")
    big = BaseModel.objects.create(name="bench-big", hf_id="bench/big")
    pool = BackendPool.objects.create(name="bench-pool", base_model=tiny, kind="dev", gpu_hourly_cost_cents=250)
    Backend.objects.create(pool=pool, url="http://bench.test")
    Price.objects.create(base_model=tiny, effective_from=date(2025, 1, 1), input_price=Decimal("15"), output_price=Decimal("60"))
    Price.objects.create(base_model=tiny, effective_from=date(2026, 1, 16), input_price=Decimal("12.5"), output_price=Decimal("50"))
    Price.objects.create(base_model=big, effective_from=date(2025, 1, 1), input_price=Decimal("300"), output_price=Decimal("900"))
    Tenant.objects.bulk_create([Tenant(slug=f"bench-{i:04d}", name=f"Bench {i}") for i in range(tenants)])
    tenant_ids = list(Tenant.objects.filter(slug__startswith="bench-").order_by("pk").values_list("pk", flat=True))
    assert tenant_ids == list(range(tenant_ids[0], tenant_ids[0] + tenants)), "tenant ids must be contiguous"
    user = get_user_model().objects.create_user(username="bench@x.test", email="bench@x.test", password="x" * 12)
    Membership.all_tenants.create(tenant_id=tenant_ids[0], user=user, role=Role.OWNER)

    results = []
    t0 = time.perf_counter()
    generate_ledger(rows, tenant_ids, pool.pk)
    results.append(("generate ledger", time.perf_counter() - t0, f"{rows:,} rows"))
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute("ANALYZE serving_usagerecord")

    t0 = time.perf_counter()
    written = rating.rate_range(PERIOD, date(2026, 1, DAYS), now=datetime(2026, 2, 1, 1, tzinfo=dt_timezone.utc))
    results.append(("rate 31 days", time.perf_counter() - t0, f"{written:,} rollup rows"))
    t0 = time.perf_counter()
    rating.rate_range(PERIOD, date(2026, 1, DAYS), now=datetime(2026, 2, 1, 1, tzinfo=dt_timezone.utc))
    results.append(("rerate 31 days (idempotent)", time.perf_counter() - t0, ""))
    t0 = time.perf_counter()
    invoices = invoicing.period_close(period=PERIOD, now=datetime(2026, 2, 1, 2, tzinfo=dt_timezone.utc), rerate=False)
    results.append((f"close period ({tenants} tenants)", time.perf_counter() - t0, f"{len(invoices):,} invoices"))

    # Console pages, with the data above (the first tenant has rows/tenants ledger rows).
    client = Client()
    client.force_login(user)
    settings.ROOT_URLCONF = "tests.billing.urls" if "billing-usage" not in _names() else settings.ROOT_URLCONF
    invoice = Invoice.all_tenants.filter(tenant_id=tenant_ids[0]).first()
    from django.urls import clear_url_caches

    clear_url_caches()
    for label, url in (("console usage page", "/t/bench-0000/billing/"), ("console invoice list", "/t/bench-0000/billing/invoices/"),
                       ("console invoice page", f"/t/bench-0000/billing/invoices/{invoice.pk}/")):
        client.get(url)  # warm
        t0 = time.perf_counter()
        for _ in range(5):
            status = client.get(url).status_code
        results.append((label, (time.perf_counter() - t0) / 5, f"HTTP {status}, mean of 5"))
    return results


def _names() -> set[str]:
    from django.urls import get_resolver

    return {k for k in get_resolver().reverse_dict.keys() if isinstance(k, str)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--write-docs", action="store_true", help="append the results to docs/benchmarks.md")
    args = parser.parse_args()
    setup_test_environment()
    old = setup_databases(verbosity=0, interactive=False)
    try:
        results = run(args.rows, args.tenants)
    finally:
        teardown_databases(old, verbosity=0)
    vendor = connection.vendor
    lines = [f"### Billing rating ({vendor}, {args.rows:,} ledger rows, {args.tenants:,} tenants, {date.today()})", "",
             "| step | seconds | ledger rows/s | note |", "|---|---:|---:|---|"]
    for label, seconds, note in results:
        per_s = f"{args.rows / seconds:,.0f}" if label.startswith(("rate", "rerate", "generate")) else ""
        shown = f"{seconds * 1000:.1f} ms" if label.startswith("console") else f"{seconds:.2f}"
        lines.append(f"| {label} | {shown} | {per_s} | {note} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        path = ROOT / "docs" / "benchmarks.md"
        with path.open("a") as f:
            f.write(("\n" if path.exists() else "# Benchmarks\n\n") + text)


if __name__ == "__main__":
    main()
