"""Billing's periodic tasks (Celery beat). No model imports: portal/settings.py reads this."""

from celery.schedules import crontab

BEAT_SCHEDULE = {
    "billing-rate-recent": {"task": "billing.rate_recent", "schedule": crontab(minute="*/15")},
    "billing-close-previous-period": {"task": "billing.close_previous_period", "schedule": crontab(hour=1, minute=30)},
    "billing-stripe-reconcile": {"task": "billing.stripe_reconcile", "schedule": crontab(minute=7)},
    "billing-dunning": {"task": "billing.dunning_run", "schedule": crontab(hour=6, minute=0)},
}

# Budget and quota alerts (billing/alerts.py): thresholds checked against the ledger every minute.
ALERTS_BEAT_SCHEDULE = {
    "billing-alerts-check": {"task": "billing.alerts_check_all", "schedule": crontab(minute="*")},
}
