from datetime import date, timedelta

from django.core.management.base import BaseCommand, CommandError

from billing import periods, rating


class Command(BaseCommand):
    help = "Rate (roll up) the usage ledger for a range of UTC days. Safe to rerun."

    def add_arguments(self, parser):
        parser.add_argument("--from", dest="first", help="YYYY-MM-DD (default: 2 days ago)")
        parser.add_argument("--to", dest="last", help="YYYY-MM-DD (default: today)")

    def handle(self, *args, first=None, last=None, **options):
        today = periods.utc_today()
        try:
            first_day = date.fromisoformat(first) if first else today - timedelta(days=2)
            last_day = date.fromisoformat(last) if last else today
        except ValueError:
            raise CommandError("Dates look like 2026-01-31.") from None
        rows = rating.rate_range(first_day, last_day)
        self.stdout.write(f"Rated {first_day}..{last_day}: {rows} rollup row(s).")
