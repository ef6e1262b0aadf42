from datetime import date

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from billing import invoicing, periods


class Command(BaseCommand):
    help = "Close a billing month (default: last month): rerate it and issue one invoice per tenant with usage."

    def add_arguments(self, parser):
        parser.add_argument("--period", help="YYYY-MM (default: the previous month)")
        parser.add_argument("--no-rerate", action="store_true", help="Use the rollup as it is (rated already).")

    def handle(self, *args, period=None, no_rerate=False, **options):
        if period:
            try:
                start = date.fromisoformat(f"{period}-01")
            except ValueError:
                raise CommandError("--period must look like 2026-01") from None
        else:
            start = periods.previous_period(periods.period_of(periods.utc_today()))
        try:
            invoices = invoicing.period_close(period=start, rerate=not no_rerate)
        except ValidationError as exc:
            raise CommandError(exc.messages[0]) from None
        self.stdout.write(f"Closed {start:%Y-%m}: {len(invoices)} invoice(s).")
