"""The dev backend over HTTP: a plain JSON call and the greedy token ids of a TGI /generate."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def call(url: str, path: str, body: dict | None = None) -> tuple[int, dict, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, dict(error.headers), error.read()
    try:
        return status, headers, json.loads(raw) if raw else None
    except ValueError:
        return status, headers, raw.decode()


def greedy_ids(url: str, prompt: str, adapter_id: str | None = None, max_new_tokens: int = 8) -> list[int]:
    parameters = {"max_new_tokens": max_new_tokens, "do_sample": False, "details": True}
    if adapter_id:
        parameters["adapter_id"] = adapter_id
    status, _, answer = call(url, "/generate", {"inputs": prompt, "parameters": parameters})
    assert status == 200, answer
    return [token["id"] for token in answer["details"]["tokens"]]

