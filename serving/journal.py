"""The gateway's request journal: a durable record of every admitted request, so that usage that reached a
client is billed whatever happens to the process.

One folder per gateway process, `PLATFORM_GATEWAY_JOURNAL_DIR/<host>-<pid>-<random>/`:
- `lock`, held under flock by the owning process for as long as it lives: a free lock means it stopped;
- `log.<n>`: append-only JSON lines, one per admitted request, written with one write() at admission: who,
  which model and pool, the prompt estimate, the admission reservation, and its slot number below;
- `slots`: a memory-mapped table of 64-byte slots, one per request in flight: a sequence number, tokens
  delivered, input tokens, time to first token, backend, duration and the scheduler slot. The gateway
  updates it in place as it delivers tokens: a store into shared memory, no system call. A request's slot is
  cleared once its ledger record is durable and its reservation settled; then the request is done.

Durability: write() and stores into a shared file mapping are in the kernel's page cache at once, so they
survive SIGKILL, an OOM kill or a crash of the process. Nothing is fsynced per request: an operating-system
crash or power loss can lose what the kernel had not written back (by default up to about 30 s of it,
vm.dirty_expire_centisecs); the log and the table are written back in the background as any file.

Recovery (`DeadJournal`, run by `journal_recover` in the gateway at start-up and every SCAN_S by any running
gateway process on the host): the folder of a process that stopped is adopted (its lock taken); every
request whose slot still holds its sequence number becomes a ledger record with status `interrupted` and
the tokens the journal says were delivered, and its reservation is settled with the same figures; then the
folder is removed. The ledger's request_id is unique and settling is idempotent, so a recovery that is itself
interrupted and run again counts nothing twice. Log files are rotated at ROTATE_BYTES (the open requests'
lines are copied into the next file first). No Django import here.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import secrets
import shutil
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SLOT = struct.Struct("<QIiiiII32s")  # seq, output, input (-1 unknown), ttft ms, backend id, flags, duration ms, slot member
PROGRESS = struct.Struct("<QIiiiII")  # the same without the scheduler slot
MEMBER_OFFSET = PROGRESS.size
SLOT_SIZE = 64
assert SLOT.size == SLOT_SIZE
INITIAL_SLOTS = 1024
ROTATE_BYTES = 8 << 20
SCAN_S = 2.0
ACCEPTED = 1  # flags: a backend accepted the request (its prompt is counted)


@dataclass(slots=True)
class JournalEntry:
    """One admitted request's place in the journal."""

    journal: Journal
    index: int
    seq: int
    pending: int = 2  # the ledger record and the settle still to happen

    def progress(self, call) -> None:
        """Store what the request has delivered so far (the gateway calls it as tokens go out)."""
        inp = call.input_tokens
        PROGRESS.pack_into(
            self.journal.mm, self.index * SLOT_SIZE, self.seq, call.output_tokens, -1 if inp is None else inp,
            -1 if call.ttft_ms is None else call.ttft_ms, call.backend_id or 0, ACCEPTED if call.backend_accepted else 0,
            int((time.perf_counter() - call.started_at) * 1000),
        )

    def slot(self, member: str) -> None:
        """The scheduler slot the request holds ("<tenant>:<slot id>"), so a recovery frees it at once."""
        self.journal.mm[self.index * SLOT_SIZE + MEMBER_OFFSET:(self.index + 1) * SLOT_SIZE] = member.encode()[:32].ljust(32, b"\0")

    def part_done(self) -> None:
        """The ledger record is durable, or the settle happened: after both, the request leaves the journal."""
        self.pending -= 1
        if self.pending == 0:
            self.journal.close(self)


class Journal:
    """This process's journal (module docstring). Used from one thread (the gateway's event loop)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp = self.directory / f".{name}"
        tmp.mkdir()
        self._lock_fd = os.open(tmp / "lock", os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._slots_fd = os.open(tmp / "slots", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._slots_fd, INITIAL_SLOTS * SLOT_SIZE)
        self.mm = mmap.mmap(self._slots_fd, INITIAL_SLOTS * SLOT_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._free = list(range(INITIAL_SLOTS - 1, -1, -1))
        self._log_no = 0
        self._log_fd = os.open(tmp / "log.0", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._log_size = 0
        os.rename(tmp, self.directory / name)  # only now visible to adopters: never a half-made folder
        self.path = self.directory / name
        self._seq = 0
        self._open: dict[int, bytes] = {}  # slot index -> its log line (copied into the next log on rotation)

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def admit(self, record: dict) -> JournalEntry:
        """Journal an admitted request (one write). `record`: see serving.gateway.accounting.Accounting.journal_line."""
        if not self._free:
            self._grow()
        index = self._free.pop()
        self._seq += 1
        seq = self._seq
        SLOT.pack_into(self.mm, index * SLOT_SIZE, seq, 0, -1, -1, 0, 0, 0, b"")
        record["s"], record["i"] = seq, index
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        try:
            if self._log_size + len(line) > ROTATE_BYTES:
                self._rotate()
            written = os.write(self._log_fd, line)
        except OSError:
            self._free.append(index)
            raise
        if written != len(line):  # (a full disk): take the torn line back, so the next one starts clean
            self._free.append(index)
            os.ftruncate(self._log_fd, self._log_size)
            raise OSError(f"journal {self.path}: short write ({written} of {len(line)} bytes)")
        self._log_size += len(line)
        self._open[index] = line
        return JournalEntry(self, index, seq)

    def close(self, entry: JournalEntry) -> None:
        """The request is done (recorded and settled): clear its slot."""
        if self._open.pop(entry.index, None) is None:
            return
        self.mm[entry.index * SLOT_SIZE:entry.index * SLOT_SIZE + 8] = b"\0" * 8
        self._free.append(entry.index)

    def _grow(self) -> None:
        size = len(self.mm)
        self.mm.resize(size * 2)  # extends the file too
        self._free.extend(range(size * 2 // SLOT_SIZE - 1, size // SLOT_SIZE - 1, -1))

    def _rotate(self) -> None:
        """Start the next log with the open requests' lines, then remove the previous log."""
        old = self.path / f"log.{self._log_no}"
        self._log_no += 1
        fd = os.open(self.path / f"log.{self._log_no}", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        data = b"".join(self._open.values())
        if data:
            os.write(fd, data)
        os.close(self._log_fd)
        self._log_fd, self._log_size = fd, len(data)
        os.unlink(old)

    def stop(self) -> None:
        """Close the journal. With nothing in flight its folder is removed; else it stays for a recovery."""
        os.close(self._log_fd)
        self.mm.close()
        os.close(self._slots_fd)
        if not self._open:
            shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)


# ---- recovery -------------------------------------------------------------------------------------


@dataclass(slots=True)
class OpenRequest:
    """A request a stopped process had admitted and not finished: its journal line and its slot."""

    record: dict
    output_tokens: int
    input_tokens: int | None
    ttft_ms: int | None
    backend_id: int | None
    accepted: bool
    duration_ms: int
    slot_member: str

    @property
    def request_id(self) -> str:
        return self.record["id"]


class DeadJournal:
    """The folder of a gateway process that stopped, adopted (locked) by this process."""

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self._lock_fd = lock_fd

    def open_requests(self) -> list[OpenRequest]:
        try:
            table = (self.path / "slots").read_bytes()
        except FileNotFoundError:
            table = b""
        found: dict[str, OpenRequest] = {}
        for log_path in sorted(self.path.glob("log.*"), key=lambda p: int(p.suffix[1:] or 0)):
            with open(log_path, "rb") as fh:
                for line in fh:
                    if not line.endswith(b"\n"):
                        continue  # torn: the process died inside this write, before it served the request
                    try:
                        record = json.loads(line)
                        index, seq = record["i"], record["s"]
                    except (ValueError, KeyError, TypeError):
                        log.warning("journal %s: skipped a line that is not a request record: %.200r", log_path, line)
                        continue
                    off = index * SLOT_SIZE
                    if off + SLOT_SIZE > len(table):
                        continue
                    s_seq, out, inp, ttft, backend, flags, duration, member = SLOT.unpack_from(table, off)
                    if s_seq != seq:
                        continue  # finished (cleared), or the slot was reused after it finished
                    found[record["id"]] = OpenRequest(
                        record, out, None if inp < 0 else inp, None if ttft < 0 else ttft, backend or None,
                        bool(flags & ACCEPTED), duration, member.rstrip(b"\0").decode(errors="replace"),
                    )
        return list(found.values())

    def remove(self) -> None:
        """Delete the folder (still holding its lock, so nobody else adopts it meanwhile), then release it."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)

    def release(self) -> None:
        """Give the folder back (recovery failed): another process, or a later scan, adopts it again."""
        os.close(self._lock_fd)


def adopt_dead(directory: Path, *, own: Path | None = None, busy: set[Path] = frozenset()) -> list[DeadJournal]:
    """Lock the folders of stopped gateway processes in `directory` (not `own`, not those in `busy`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    adopted = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_dir() or path == own or path in busy:
            continue
        try:
            fd = os.open(path / "lock", os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its process is alive
            os.close(fd)
            continue
        if not path.is_dir():  # removed by another adopter meanwhile
            os.close(fd)
            continue
        adopted.append(DeadJournal(path, fd))
    return adopted
