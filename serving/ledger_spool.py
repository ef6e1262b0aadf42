"""The usage ledger's local spool: records the database could not take, kept on local disk until it can.

Files: `ledger-<host>-<pid>-<random>.jsonl` in PLATFORM_LEDGER_SPOOL_DIR, one JSON object per line. Each
gateway process appends only to its own file, which it holds under an exclusive `flock` for as long as the
file exists, so processes never write into each other's file. A file whose lock is free belongs to a
process that stopped: the next process that looks adopts it (takes the lock) and replays it.

An append is one `write` then `fsync`; a failed append is truncated away, so a file can only end in a torn
line when its process died mid-write, and replay skips such a line with a warning. Replay hands the records
to an idempotent writer (the ledger inserts with ignore_conflicts on the unique request_id) and only then
unlinks the file, so a crash between the insert and the unlink replays the file again without counting
anything twice. A Spool is used by one thread only (the ledger's); `spool_summary` may read from anywhere.

The directory must be on a local disk (flock is unreliable on network filesystems). No Django import here.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PATTERN = "ledger-*.jsonl"
REPLAY_CHUNK = 500  # records per write call during replay


@dataclass(slots=True)
class SpoolFile:
    path: Path
    fd: int  # open and flock'ed by this process
    records: int  # complete lines (newline-terminated)
    size: int  # bytes: the end of the last complete append


@dataclass(frozen=True, slots=True)
class SpoolSummary:
    """What waits in a spool directory (every process's files on this host)."""

    files: int
    records: int
    bytes: int
    oldest: float | None  # modification time (epoch seconds) of the oldest file


class Spool:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._own: SpoolFile | None = None  # this process's file, created on the first append
        # Locked, replayed, never appended to: files of stopped processes, and ours after an append we could not undo.
        self._sealed: dict[Path, SpoolFile] = {}

    @property
    def records(self) -> int:
        """Records held by this process (its own file and adopted ones), waiting for the database."""
        return sum(f.records for f in self._held())

    @property
    def has_own_records(self) -> bool:
        """True while this process's own appends wait for replay (the database is presumed down)."""
        return self._own is not None and self._own.records > 0

    @property
    def own_path(self) -> Path | None:
        return self._own.path if self._own is not None else None

    def _held(self) -> list[SpoolFile]:
        return [*self._sealed.values(), *([self._own] if self._own is not None else [])]

    # ---- appending ----------------------------------------------------------------------------------

    def append(self, records: list[dict]) -> Path:
        """Append the records as JSON lines and fsync them. Returns the file; raises OSError (nothing appended)."""
        if self._own is None:
            self._own = self._create_own()
        own = self._own
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        try:
            _write_all(own.fd, data)
            os.fsync(own.fd)
        except OSError:
            try:
                os.ftruncate(own.fd, own.size)  # no torn line in front of the next append
            except OSError:
                self._sealed[own.path] = own  # keep its records for replay; the next append starts a new file
                self._own = None
            raise
        own.size += len(data)
        own.records += len(records)
        return own.path

    def _create_own(self) -> SpoolFile:
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            path = self.directory / f"ledger-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while an adopter looks at the (empty) file
            if _is_linked(fd, path):
                _fsync_dir(self.directory)  # the new name survives a power loss
                return SpoolFile(path, fd, 0, 0)
            os.close(fd)  # an adopter removed it as an empty orphan before we locked it: take another name

    # ---- adopting and replaying ---------------------------------------------------------------------

    def adopt_orphans(self) -> int:
        """Lock the files of processes that stopped (their lock is free). Returns how many were adopted."""
        if not self.directory.is_dir():
            return 0
        held = {f.path for f in self._held()}
        adopted = 0
        for path in sorted(self.directory.glob(PATTERN)):
            if path in held:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive and owns it
                os.close(fd)
                continue
            if not _is_linked(fd, path):  # replayed and removed by another process meanwhile
                os.close(fd)
                continue
            size = os.fstat(fd).st_size
            if size == 0:
                self._remove(SpoolFile(path, fd, 0, 0))
                continue
            records = _count_lines(path)
            self._sealed[path] = SpoolFile(path, fd, records, size)
            adopted += 1
            log.warning("ledger spool: adopted %s (%d usage records) from a gateway process that stopped; "
                        "it is written to the database by this process's replay.", path, records)
        return adopted

    def replay(self, write: Callable[[list[dict]], None]) -> int:
        """Pass every held file's records to `write` (which must be idempotent), in chunks, then remove the file.

        Returns the records passed. An exception from `write` propagates and leaves that file (and those
        after it) in place for the next replay; files already replayed are gone.
        """
        done = 0
        for held in self._held():
            for chunk in _read_chunks(held.path):
                write(chunk)
                done += len(chunk)
            self._remove(held)
        return done

    def _remove(self, held: SpoolFile) -> None:
        """Unlink while still holding the lock, then release it: nobody can adopt a replayed file."""
        os.unlink(held.path)
        os.close(held.fd)
        if self._own is held:
            self._own = None
        self._sealed.pop(held.path, None)

    def close(self) -> None:
        """Release the locks; the files stay for the next process to replay."""
        for held in self._held():
            os.close(held.fd)
        self._own = None
        self._sealed.clear()


def spool_summary(directory: Path) -> SpoolSummary:
    """Files and records waiting in a spool directory, whoever holds them (for staff pages)."""
    directory = Path(directory)
    files = records = size = 0
    oldest = None
    for path in directory.glob(PATTERN) if directory.is_dir() else []:
        try:
            stat = path.stat()
            records += _count_lines(path)
        except FileNotFoundError:  # replayed meanwhile
            continue
        files += 1
        size += stat.st_size
        oldest = stat.st_mtime if oldest is None else min(oldest, stat.st_mtime)
    return SpoolSummary(files, records, size, oldest)


def _read_chunks(path: Path) -> Iterator[list[dict]]:
    """The file's records in chunks; lines that are not JSON objects are skipped with a warning."""
    chunk: list[dict] = []
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            torn = not line.endswith(b"\n")
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if torn:
                    log.warning("ledger spool: %s ends in a torn line (the process stopped mid-write; that record "
                                "was never confirmed written), skipped: %.300r", path, line)
                else:
                    log.warning("ledger spool: %s line %d is not a usage record (%s), skipped: %.300r", path, number, exc, line)
                continue
            chunk.append(record)
            if len(chunk) >= REPLAY_CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            count += block.count(b"\n")
    return count


def _is_linked(fd: int, path: Path) -> bool:
    """True when `path` still names the file open as `fd` (not unlinked or replaced since it was opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
