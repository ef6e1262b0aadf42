"""Price entries: when a new (or moved) entry may start. Past periods never change; usage already rated this month
changes only when staff say so."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from django.core.exceptions import ValidationError

from billing import periods, rating, selectors
from billing.models import Price, price_start_error
from tests.support.billing import price, usage, utc

TODAY = date(2026, 11, 28)


@pytest.mark.parametrize("day, confirmed, allowed", [
    (date(2026, 10, 1), True, False),    # October has ended (and is invoiced): never, even when confirmed
    (date(2026, 10, 31), True, False),
    (date(2026, 11, 1), False, False),   # this month, already rated: only when confirmed
    (date(2026, 11, 27), False, False),
    (TODAY, False, False),               # today's usage so far is rated too
    (date(2026, 11, 1), True, True),
    (TODAY, True, True),
    (date(2026, 11, 29), False, True),   # not in force yet: nothing changes
    (date(2027, 1, 1), False, True),
])
def test_price_start_rule(db, day, confirmed, allowed):
    assert (price_start_error(day, today=TODAY, confirmed=confirmed) is None) is allowed


def test_no_start_before_an_issued_invoice_ends(world, invoice):
    # January 2026 is invoiced: refused whatever "today" is, with a message naming the reason.
    message = price_start_error(date(2026, 1, 20), today=date(2026, 1, 31), confirmed=True)
    assert message and "ACME-202601" in message


def _add(client, catalog, day, **extra):
    return client.post("/admin/billing/price/add/", {
        "base_model": catalog.base.pk, "input_price": "200", "output_price": "400", "training_price": "0",
        "effective_from": day.isoformat(), **extra,
    })


def test_admin_refuses_a_price_in_a_past_period_with_a_field_error(client, world, catalog, staff):
    client.force_login(world.owner)
    last_month = periods.previous_period(periods.period_of(periods.utc_today()))
    response = _add(client, catalog, last_month, reprice_confirmed="on")
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "effective_from" in errors and "ended" in errors["effective_from"][0]
    assert not Price.objects.exists()


def test_admin_asks_before_repricing_usage_already_rated(client, world, catalog, staff):
    price(catalog.base, effective_from=date(2020, 1, 1), inp="100", out="100")
    now = utc(*periods.utc_today().timetuple()[:3])
    usage(world.tenant, at=now, pool=catalog.shared, inp=1_000_000)
    rating.rate_day(periods.utc_today())
    assert selectors.period_cost_so_far(tenant=world.tenant).total_cents == 100
    client.force_login(world.owner)
    today = periods.utc_today()

    response = _add(client, catalog, today)
    assert response.status_code == 200 and "effective_from" in response.context["adminform"].form.errors
    assert selectors.period_cost_so_far(tenant=world.tenant).total_cents == 100  # unchanged

    assert _add(client, catalog, today + timedelta(days=1)).status_code == 302  # from tomorrow: nothing repriced
    assert selectors.period_cost_so_far(tenant=world.tenant).total_cents == 100

    assert _add(client, catalog, today, reprice_confirmed="on").status_code == 302  # staff said so
    assert selectors.period_cost_so_far(tenant=world.tenant).total_cents == 200


def test_moving_a_future_entry_into_the_past_is_refused(client, world, catalog, staff):
    future = price(catalog.base, effective_from=periods.utc_today() + timedelta(days=10), inp="1", out="1")
    client.force_login(world.owner)
    last_month = periods.previous_period(periods.period_of(periods.utc_today()))
    response = client.post(f"/admin/billing/price/{future.pk}/change/", {
        "base_model": catalog.base.pk, "input_price": "1", "output_price": "1", "training_price": "0",
        "effective_from": last_month.isoformat(), "reprice_confirmed": "on",
    })
    assert response.status_code == 200 and "effective_from" in response.context["adminform"].form.errors
    future.refresh_from_db()
    assert future.effective_from > periods.utc_today()


def test_an_entry_in_force_is_history(world, catalog, client, staff):
    old = price(catalog.base, effective_from=date(2026, 1, 1), inp="1", out="1")
    old.input_price = 5
    with pytest.raises(ValidationError):
        old.full_clean()
    client.force_login(world.owner)
    assert client.post(f"/admin/billing/price/{old.pk}/delete/", {"post": "yes"}).status_code == 403
    response = client.post("/admin/billing/price/", {"action": "delete_selected", "_selected_action": [old.pk], "post": "yes"})
    assert response.status_code in (200, 302)
    assert Price.objects.filter(pk=old.pk).exists()
