"""Billing periods: calendar months in UTC, named by their first day, and a UTC day's bounds."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone as dt_timezone

from django.utils import timezone


def period_of(day: date) -> date:
    """The billing period (first day of the UTC month) that contains `day`."""
    return day.replace(day=1)


def next_period(period: date) -> date:
    return (period.replace(day=28) + timedelta(days=4)).replace(day=1)


def previous_period(period: date) -> date:
    return period_of(period - timedelta(days=1))


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time.min, tzinfo=dt_timezone.utc)
    return start, start + timedelta(days=1)


def utc_today(now: datetime | None = None) -> date:
    return (now or timezone.now()).astimezone(dt_timezone.utc).date()
