"""pytest-xdist: what each worker process gets of its own."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redis_url_for_worker(url: str, worker: int) -> str:
    """REDIS_URL with a database number of worker `worker`'s own (gw0 keeps the one given; the next ones count down
    from it, or up from it when it is too low): tests flush their database, so workers must not share one."""
    parts = urlsplit(url)
    if parts.scheme == "unix":  # unix:///path?db=N
        query = dict(p.split("=", 1) for p in parts.query.split("&") if p)
        given = int(query.get("db", 0))
        query["db"] = str(_number(given, worker))
        return f"unix://{parts.netloc}{parts.path}?" + "&".join(f"{k}={v}" for k, v in query.items())
    given = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{_number(given, worker)}"))


def _number(given: int, worker: int) -> int:
    number = given - worker if given - worker >= 0 else given + worker
    if number > 15:
        raise ValueError(f"REDIS_URL's database {given} leaves no database of its own for xdist worker gw{worker} "
                         "(Redis has 16 by default): use fewer workers or another database number")
    return number
