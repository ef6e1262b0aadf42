"""Write the usage records that stopped gateway processes left in this host's ledger spool."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from serving.ledger import ledger_spool_replay
from serving.ledger_spool import spool_summary


class Command(BaseCommand):
    help = ("Write the usage records left in the ledger spool (PLATFORM_LEDGER_SPOOL_DIR) by gateway processes that "
            "stopped. Safe to rerun: records already in the ledger are skipped. Running gateways replay their own files.")

    def handle(self, *args, **options):
        directory = settings.PLATFORM_LEDGER_SPOOL_DIR
        try:
            count = ledger_spool_replay(directory)
        except Exception as exc:
            raise CommandError(f"Replay from {directory} failed ({exc}); the spool files are kept: rerun when the database is reachable.") from exc
        left = spool_summary(directory)
        self.stdout.write(f"Replayed {count} usage record(s) from {directory}.")
        if left.records:
            self.stdout.write(f"{left.records} record(s) in {left.files} file(s) belong to running gateway processes, which replay them themselves.")
