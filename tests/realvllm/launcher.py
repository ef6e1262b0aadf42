"""Runs one command (a vLLM server) as the leader of a new process group, and takes the whole group down with it.

vLLM's API server forks engine processes (EngineCore, Worker) that outlive a SIGKILL of the server. Started through
this launcher (`python launcher.py <watched pid> -- cmd…`, with a new session), every one of them is in the
launcher's process group, so `os.killpg` stops them all; and when the watched process (the test session) dies,
however it died, or the server exits, the launcher kills the group itself. Standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> int:
    watched, sep, *command = sys.argv[1:]
    if sep != "--" or not command:
        raise SystemExit("usage: launcher.py <watched pid> -- command …")
    child = subprocess.Popen(command)
    stopping = []

    def on_term(signum, frame):  # graceful stop: let the server stop its engine, the finally below kills the rest
        stopping.append(time.monotonic())
        child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    rc = 1
    try:
        while True:
            try:
                rc = child.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                pass
            if not _alive(int(watched)) or (stopping and time.monotonic() - stopping[0] > 20):
                break
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGKILL)  # everything left in the group (engine processes), this launcher last
    return rc


if __name__ == "__main__":
    sys.exit(main())
