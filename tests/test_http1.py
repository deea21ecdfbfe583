"""productscene/http1.py, the batch client's HTTP/1.1 client, against a raw TCP server that answers
with exactly the bytes each test gives: every way an answer's end is told (length, chunks, end of
connection), answers it must skip or decode, kept-alive connections reused and a stale one replaced,
and no answer in time."""
from __future__ import annotations

import asyncio
import gzip

import pytest

from productscene.http1 import HTTPConnectionError, HTTPPool


class RawServer:
    """Answers each request (read up to its blank line, plus Content-Length bytes) with the next
    of ``answers``; ``None`` closes the connection instead. Counts connections and requests."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                answer = self.answers.pop(0)
                if answer is None:
                    break
                if callable(answer):
                    await answer(writer)
                else:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(answers, requests):
    """Serve ``answers``; ``requests(pool)`` is awaited; returns (its result, the server)."""
    server = RawServer(answers)

    async def main():
        tcp = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        port = tcp.sockets[0].getsockname()[1]
        pool = HTTPPool(f"http://127.0.0.1:{port}/prefix")
        try:
            return await requests(pool)
        finally:
            pool.close()
            tcp.close()
            await tcp.wait_closed()
    return asyncio.run(main()), server


def test_length_chunks_informational_and_gzip_answers_on_one_kept_alive_connection():
    zipped = gzip.compress(b'{"zipped": true}')
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(zipped) + zipped,
    ]

    async def requests(pool):
        return [await pool.request("GET", "/a?x=1"),
                await pool.request("POST", "/b", body=b"payload", content_type="application/json"),
                await pool.request("GET", "/c"),
                await pool.request("GET", "/d")]

    got, server = run(answers, requests)
    assert [(status, body) for status, _, body in got] == [
        (200, b"hello"), (201, b"wikipedia"), (404, b""), (200, b'{"zipped": true}')]
    assert got[0][1]["content-type"] == "text/plain"
    assert server.connections == 1, "the connection was not kept alive"
    first, second = server.requests[0], server.requests[1]
    assert first.startswith(b"GET /prefix/a?x=1 HTTP/1.1\r\n") and b"\r\nHost: 127.0.0.1:" in first
    assert b"Content-Length" not in first
    assert second.startswith(b"POST /prefix/b HTTP/1.1\r\n") and second.endswith(b"\r\n\r\npayload")
    assert b"Content-Type: application/json\r\n" in second and b"Content-Length: 7\r\n" in second


def test_answers_split_across_writes_and_an_answer_to_the_end_of_the_connection():
    async def slowly(writer):
        for part in (b"HTTP/1.1 200 OK\r\nContent-", b"Length: 10\r\n\r\n01234", b"56789"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)

    async def then_close(writer):
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def requests(pool):
        return [await pool.request("GET", "/slow"), await pool.request("GET", "/eof"),
                await pool.request("GET", "/after")]

    got, server = run([slowly, then_close, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], requests)
    assert [body for _, _, body in got] == [b"0123456789", b"all of it", b"ok"]
    assert server.connections == 2, "a connection the server closed must not be used again"


def test_a_stale_kept_alive_connection_is_replaced_for_a_get_but_a_post_fails():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def requests(pool):
        first = await pool.request("GET", "/one")
        # the server drops the kept-alive connection as the next request arrives, without a word
        second = await pool.request("GET", "/two")      # fails on the old connection, goes again
        return first, second

    got, server = run([ok, None, ok], requests)
    assert [body for _, _, body in got] == [b"ok", b"ok"]
    assert server.connections == 2

    async def post(pool):
        await pool.request("GET", "/one")
        with pytest.raises(HTTPConnectionError):
            await pool.request("POST", "/prompt", body=b"{}")    # not repeated: the server may have it
        return True

    got, server = run([ok, None], post)
    assert got and server.connections == 1


def test_no_answer_in_time_and_garbage_are_errors_and_the_connection_is_dropped():
    async def silent(writer):
        await asyncio.sleep(5)

    async def requests(pool):
        with pytest.raises(asyncio.TimeoutError):
            await pool.request("GET", "/slow", timeout=0.2)
        assert not pool.idle
        with pytest.raises(HTTPConnectionError, match="not HTTP"):
            await pool.request("GET", "/garbage")
        assert not pool.idle
        return True

    got, _ = run([silent, b"SMTP ready\r\n\r\n"], requests)
    assert got


def test_urls_it_refuses_and_the_host_it_names():
    with pytest.raises(ValueError, match="http:// or https://"):
        HTTPPool("ftp://example.com")
    assert HTTPPool("http://example.com").host_header == "example.com"
    assert HTTPPool("https://example.com:443/comfy/").host_header == "example.com"
    assert HTTPPool("https://example.com:443/comfy/").prefix == "/comfy"
    assert HTTPPool("http://[::1]:8188").host_header == "[::1]:8188"
