"""common/redis_clients.PipelinedClient: the gateway's per-request Redis calls over one pipelined connection per event
loop. Replies are matched to their commands in order, whatever callers give up; errors are redis-py's; a Redis that
stops answering costs a caller at most the timeout; a lost connection is opened again by the next command."""

from __future__ import annotations

import asyncio
import random
import sys

import pytest
import redis.exceptions as rex

from common import redis_clients
from common.redis_clients import PipelinedClient, PythonReader, ReplyError, pack_command, pack_command_python, pipelined_client


def run(coro):
    return asyncio.run(coro)


# ---- the wire format, without a server ------------------------------------------------------------------------


@pytest.mark.parametrize("pack", [pack_command, pack_command_python], ids=["hiredis-if-installed", "python"])
def test_commands_are_packed_as_redis_py_encodes_them(pack):
    assert pack(("EVALSHA", "ab", 2, "k{1}", "é", 1.5, b"\x00")) == (
        b"*7\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$4\r\nk{1}\r\n$2\r\n\xc3\xa9\r\n$3\r\n1.5\r\n$1\r\n\x00\r\n")
    numbers = (0.1 + 0.2, 1 / 3, 1e-07, -0.0, 1e16, 2**70, -(2**70), -3)
    assert pack(("X", *numbers)) == b"*9\r\n$1\r\nX\r\n" + b"".join(b"$%d\r\n%b\r\n" % (len(repr(n)), repr(n).encode()) for n in numbers)
    for bad in (True, None, [1]):
        with pytest.raises(rex.DataError):
            pack(("SET", "k", bad))


REPLIES = (b"+OK\r\n:42\r\n$4\r\nh\xc3\xa9l\r\n$-1\r\n*3\r\n:0\r\n$0\r\n\r\n*2\r\n:-7\r\n*-1\r\n"
           b"-NOSCRIPT No matching script\r\n*0\r\n")
EXPECTED = ["OK", 42, "hél", None, [0, "", [-7, None]], ReplyError("NOSCRIPT No matching script"), []]


def _read_all(reader, chunks):
    out = []
    for chunk in chunks:
        reader.feed(chunk)
        while (reply := reader.gets()) is not False:
            out.append(reply)
    return out


@pytest.mark.parametrize("split", ["whole", "bytewise", "random"])
def test_the_python_reader_reads_what_hiredis_reads_however_the_bytes_arrive(split):
    rng = random.Random(7)
    if split == "whole":
        chunks = [REPLIES]
    elif split == "bytewise":
        chunks = [REPLIES[i:i + 1] for i in range(len(REPLIES))]
    else:
        cuts = sorted(rng.sample(range(1, len(REPLIES)), 12))
        chunks = [REPLIES[a:b] for a, b in zip([0] + cuts, cuts + [len(REPLIES)])]
    got = _read_all(PythonReader(), chunks)
    assert got == EXPECTED and isinstance(got[5], ReplyError)
    hiredis = pytest.importorskip("hiredis")
    assert [str(r) if isinstance(r, hiredis.ReplyError) else r for r in _read_all(hiredis.Reader(encoding="utf-8"), chunks)] == [
        str(r) if isinstance(r, ReplyError) else r for r in EXPECTED]


def test_urls_it_cannot_honour_get_redis_py():
    assert isinstance(pipelined_client("redis://:pw@127.0.0.1:1/3"), PipelinedClient)
    assert isinstance(pipelined_client("unix:///tmp/r.sock?db=2"), PipelinedClient)
    assert isinstance(pipelined_client("rediss://h:1/0"), PipelinedClient)
    import redis.asyncio as aioredis

    assert isinstance(pipelined_client("rediss://h:1/0?ssl_cert_reqs=none"), aioredis.Redis)
    assert isinstance(pipelined_client("redis://h:1/0?socket_keepalive=true"), aioredis.Redis)


# ---- against a fake server: timeouts, lost connections --------------------------------------------------------


class FakeRedis:
    """A TCP server that answers '+OK' to each command it reads, or stays silent (`silent`), or closes each
    connection after `close_after` commands."""

    def __init__(self):
        self.silent = False
        self.close_after = None
        self.commands = []
        self.connections = 0
        self.server = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, reader, writer):
        self.connections += 1
        served = 0
        try:
            while True:
                header = await reader.readline()
                if not header:
                    return
                args = []
                for _ in range(int(header[1:])):
                    n = int((await reader.readline())[1:])
                    args.append((await reader.readexactly(n + 2))[:-2].decode())
                self.commands.append(args)
                served += 1
                if not self.silent:
                    writer.write(b"+OK\r\n")
                if self.close_after is not None and served >= self.close_after:
                    writer.close()
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return

    async def stop(self):
        self.server.close()


def test_a_silent_redis_costs_every_waiting_caller_the_timeout_then_a_new_connection_serves():
    async def scenario():
        fake = FakeRedis()
        client = PipelinedClient("x", redis_clients._pipelined_kwargs(await fake.start()), timeout_s=0.2)
        assert await client.execute_command("PING") == "OK"
        fake.silent = True
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await asyncio.gather(*(client.execute_command("GET", f"k{i}") for i in range(5)), return_exceptions=True)
        waited = loop.time() - t0
        assert all(isinstance(r, rex.TimeoutError) for r in results), results
        assert 0.19 <= waited < 1.0
        fake.silent = False
        assert await client.execute_command("PING") == "OK"  # a new connection
        assert fake.connections == 2
        await fake.stop()

    run(scenario())


def test_a_lost_connection_fails_its_callers_with_connection_error_and_the_next_command_reconnects():
    async def scenario():
        fake = FakeRedis()
        fake.close_after = 1
        client = PipelinedClient("x", redis_clients._pipelined_kwargs(await fake.start()), timeout_s=2)
        fake.silent = True  # the first command is read, never answered, and the connection closed
        with pytest.raises(rex.ConnectionError):
            await client.execute_command("GET", "a")
        fake.silent, fake.close_after = False, None
        assert await client.execute_command("GET", "b") == "OK"
        assert fake.connections == 2
        await fake.stop()

    run(scenario())


def test_nothing_listening_is_a_connection_error():
    async def scenario():
        fake = FakeRedis()
        url = await fake.start()
        await fake.stop()
        fake.server.close()
        await fake.server.wait_closed()
        client = PipelinedClient("x", redis_clients._pipelined_kwargs(url))
        with pytest.raises(rex.ConnectionError):
            await client.execute_command("PING")

    run(scenario())


def test_credentials_and_database_are_sent_first_on_each_connection():
    async def scenario():
        fake = FakeRedis()
        url = (await fake.start()).replace("redis://", "redis://bob:s3cret@").replace("/0", "/5")
        client = PipelinedClient("x", redis_clients._pipelined_kwargs(url))
        assert await client.execute_command("PING") == "OK"
        assert fake.commands == [["AUTH", "bob", "s3cret"], ["SELECT", "5"], ["PING"]]
        await fake.stop()

    run(scenario())


# ---- against a real Redis ------------------------------------------------------------------------------------


@pytest.mark.redis
def test_concurrent_callers_get_their_own_replies_even_when_some_give_up(redis_url):
    async def scenario():
        client = pipelined_client(redis_url)
        await client.execute_command("SET", "pc:x", "1")

        async def one(i):
            await client.execute_command("SET", f"pc:{i}", str(i))
            return await client.execute_command("GET", f"pc:{i}")

        tasks = [asyncio.ensure_future(one(i)) for i in range(300)]
        await asyncio.sleep(0)
        for t in tasks[::7]:
            t.cancel()  # given up mid-flight: their replies still come, and are dropped in order
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, r in enumerate(results):
            assert isinstance(r, asyncio.CancelledError) if i % 7 == 0 else r == str(i)
        assert await client.execute_command("GET", "pc:x") == "1"

    run(scenario())


@pytest.mark.redis
def test_a_script_is_sent_whole_when_redis_does_not_know_it_and_errors_are_redis_pys(redis_url):
    async def scenario():
        client = pipelined_client(redis_url)
        script = client.register_script(f"return {{KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1, '{random.random()}'}}")
        await client.execute_command("SCRIPT", "FLUSH")
        assert (await script(keys=["pc:k"], args=["v", 41]))[:3] == ["pc:k", "v", 42]  # NOSCRIPT, then EVAL
        assert (await script(keys=["pc:k"], args=["w", 1]))[:3] == ["pc:k", "w", 2]  # EVALSHA now
        with pytest.raises(rex.NoScriptError):
            await client.execute_command("EVALSHA", "0" * 40, 0)
        with pytest.raises(rex.ResponseError, match="wrong number of arguments"):
            await client.execute_command("GET")
        bad = client.register_script("return redis.error_reply('OOM not really')")
        with pytest.raises(rex.OutOfMemoryError):
            await bad()
        assert await client.execute_command("PING") == "PONG"  # the connection survives error replies

    run(scenario())


@pytest.mark.redis
def test_without_hiredis_the_python_reader_serves(redis_url, monkeypatch):
    monkeypatch.setitem(sys.modules, "hiredis", None)

    async def scenario():
        client = pipelined_client(redis_url)
        await client.execute_command("DEL", "pc:h")
        await client.execute_command("HSET", "pc:h", "a", "1", "b", "é")
        assert await client.execute_command("HMGET", "pc:h", "a", "b", "c") == ["1", "é", None]
        assert isinstance(client._conn.reader, PythonReader)

    run(scenario())
