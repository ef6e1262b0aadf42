"""Signed alert webhooks, delivered to public addresses only.

Every delivery, and every redirect hop of it, resolves the host, refuses it if any address it resolves to is not a
public one (private, loopback, link-local — 169.254.169.254 included —, shared, reserved, multicast; IPv4-mapped IPv6
checked as IPv4), then connects to the address it checked (TLS still verifies the host's certificate and sends its
name): a second lookup that answers differently cannot move the connection. Redirects are never followed
automatically: at most MAX_REDIRECTS hops, each checked like the first, each with the same signed body.

Signature: `X-Platform-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`, with the Unix time in
`X-Platform-Timestamp`; receivers recompute it and refuse timestamps older than a few minutes (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

from django.conf import settings

SIGNATURE_HEADER = "X-Platform-Signature"
TIMESTAMP_HEADER = "X-Platform-Timestamp"
DELIVERY_HEADER = "X-Platform-Delivery"
MAX_REDIRECTS = 3
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
MAX_RESPONSE_BYTES = 64 * 1024


class Refused(Exception):
    """The URL may not be delivered to (an address that is not public, a scheme other than https): never retried."""


class DeliveryFailed(Exception):
    """The receiver could not be reached or did not answer 2xx: retried with backoff."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for a body sent at `timestamp` (Unix seconds)."""
    return "v1=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def address_allowed(address: str) -> bool:
    """Whether a resolved address is public (the only kind a webhook may reach)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback and settings.PLATFORM_WEBHOOKS_ALLOW_LOOPBACK:
        return True  # tests only: a local receiver
    return ip.is_global and not ip.is_multicast


def resolve_checked(host: str, port: int) -> str:
    """One address of `host` to connect to, after checking every address it resolves to; Refused otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DeliveryFailed(f"cannot resolve {host}: {exc}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    refused = [a for a in addresses if not address_allowed(a)]
    if refused or not addresses:
        raise Refused(f"{host} resolves to {', '.join(refused) or 'nothing'}, not a public address: webhooks reach public addresses only.")
    return addresses[0]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address already checked, verifying the certificate of the URL's host name."""

    def __init__(self, host: str, port: int, address: str, **kwargs):
        super().__init__(host, port, **kwargs)
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP to a checked loopback address: only with PLATFORM_WEBHOOKS_ALLOW_LOOPBACK (tests)."""

    def __init__(self, host: str, port: int, address: str, **kwargs):
        super().__init__(host, port, **kwargs)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def _post_once(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
    """POST to one URL (no redirect followed): (status, Location header)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
        raise Refused(f"{url[:100]} is not an https:// URL without credentials.")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = resolve_checked(parts.hostname, port)
    timeout = settings.PLATFORM_WEBHOOK_TIMEOUT_S
    if parts.scheme == "https":
        conn = _PinnedHTTPSConnection(parts.hostname, port, address, timeout=timeout, context=ssl.create_default_context())
    elif settings.PLATFORM_WEBHOOKS_ALLOW_LOOPBACK and ipaddress.ip_address(address).is_loopback:
        conn = _PinnedHTTPConnection(parts.hostname, port, address, timeout=timeout)
    else:
        raise Refused("Webhooks are delivered over https only.")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        return response.status, response.getheader("Location")
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}"[:300]) from None
    finally:
        conn.close()


def deliver(*, url: str, body: bytes, secret: str, delivery_id: int) -> int:
    """POST the signed body to `url`, following up to MAX_REDIRECTS redirects, each checked. Returns the final 2xx
    status; raises Refused (not retried) or DeliveryFailed (retried)."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "llm-platform-webhooks/1",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        DELIVERY_HEADER: str(delivery_id),
    }
    for _ in range(MAX_REDIRECTS + 1):
        status, location = _post_once(url, body, headers)
        if status in REDIRECT_STATUSES and location:
            url = urljoin(url, location)
            continue
        if 200 <= status < 300:
            return status
        raise DeliveryFailed(f"the endpoint answered HTTP {status}")
    raise DeliveryFailed(f"more than {MAX_REDIRECTS} redirects")
