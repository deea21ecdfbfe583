"""A small HTTP/1.1 client on asyncio for the batch client's many short requests to ComfyUI: one
request at a time on each kept-alive connection, the request written in one call, the answer read
by ``Content-Length``, chunks, or to the end of the connection. Host-free, standard library only.

What it leaves out, because ComfyUI's API does not need it: redirects, cookies, proxies, request
streaming, ``Expect: 100-continue``. A compressed answer (``Content-Encoding: gzip``/``deflate``,
which a server should not send since no ``Accept-Encoding`` is sent) is decompressed.

aiohttp's client does the same work with several tasks, header multidicts, cookie and trace hooks a
request: at catalogue scale that was a large share of the client's CPU time (BENCHMARKS.md).
"""
from __future__ import annotations

import asyncio
import ssl
import urllib.parse
import zlib


class HTTPConnectionError(ConnectionError):
    """The connection failed, was closed before a whole answer came, or the answer is not HTTP."""


class _Connection(asyncio.Protocol):
    """One connection; :meth:`exchange` sends a request and returns the parsed answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.used = False

    # -------------------------------------------------------------- protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._answer()

    def eof_received(self) -> bool:
        self._ended(None)
        return False

    def connection_lost(self, exc) -> None:
        self._ended(exc)

    def _ended(self, exc) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self._answer()          # an answer that runs to the end of the connection
            if not waiter.done():
                why = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection"
                waiter.set_exception(HTTPConnectionError(f"no whole answer ({why})"))

    # -------------------------------------------------------------- exchange
    async def exchange(self, request: bytes, timeout: float) -> tuple[int, dict, bytes]:
        self.used = True
        self.waiter = waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._time_out, waiter, timeout)
        try:
            self.transport.write(request)
            return await waiter
        except BaseException:
            self.close()            # half an exchange (cancelled, timed out): never reused
            raise
        finally:
            timer.cancel()
            self.waiter = None

    def _time_out(self, waiter: asyncio.Future, timeout: float) -> None:
        if not waiter.done():
            waiter.set_exception(asyncio.TimeoutError(f"no answer within {timeout:.0f} s"))
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _answer(self) -> None:
        """Sets the waiter's result once ``buf`` holds a whole answer (1xx answers are skipped)."""
        try:
            answer = _parse(self.buf, self.closed)
        except (ValueError, UnicodeDecodeError, zlib.error) as e:
            self.waiter.set_exception(HTTPConnectionError(f"the answer is not HTTP/1.x: {e}"))
            self.close()
            return
        if answer is None:
            return
        status, headers, body, used, keep = answer
        del self.buf[:used]
        if not keep:
            self.close()
        self.waiter.set_result((status, headers, body))


def _parse(buf: bytearray, ended: bool):
    """(status, headers, body, bytes used, keep the connection) from the start of ``buf``, or None
    while the answer is not whole. ``ended``: nothing more will come."""
    start = 0
    while True:
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            return None
        lines = bytes(buf[start:end]).decode("latin-1").split("\r\n")
        version, status_text = lines[0].split(" ", 2)[:2]
        if not version.startswith("HTTP/1."):
            raise ValueError(f"status line {lines[0][:80]!r}")
        status = int(status_text)
        body_at = end + 4
        if 100 <= status < 200:         # informational: the answer follows
            start = body_at
            continue
        break
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = _chunks(buf, body_at)
        if chunks is None:
            return None
        body, used = chunks
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if len(buf) - body_at < n:
            return None
        body, used = bytes(buf[body_at:body_at + n]), body_at + n
    elif status in (204, 304):
        body, used = b"", body_at
    else:                             # to the end of the connection
        if not ended:
            return None
        body, used, keep = bytes(buf[body_at:]), len(buf), False
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate", "x-gzip"):
        body = zlib.decompress(body, 47)       # gzip or zlib header, detected
    elif encoding != "identity":
        raise ValueError(f"content encoding {encoding!r}")
    return status, headers, body, used, keep


def _chunks(buf: bytearray, at: int):
    """(body, bytes used) of a chunked body starting at ``at``, or None while it is not whole."""
    parts = []
    while True:
        line_end = buf.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buf[at:line_end]).split(b";", 1)[0].strip(), 16)
        at = line_end + 2
        if size == 0:                   # trailers (usually none), then an empty line
            while True:
                line_end = buf.find(b"\r\n", at)
                if line_end < 0:
                    return None
                empty = line_end == at
                at = line_end + 2
                if empty:
                    return b"".join(parts), at
        if len(buf) < at + size + 2:
            return None
        parts.append(bytes(buf[at:at + size]))
        at += size + 2


class HTTPPool:
    """Kept-alive connections to one server (``base_url``: scheme, host, port and a path prefix)."""

    def __init__(self, base_url: str):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"{base_url!r}: expected an http:// or https:// URL")
        self.tls = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.tls else 80)
        default_port = url.port is None or url.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host.encode("idna").decode("ascii")
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.prefix = url.path.rstrip("/")
        self.idle: list[_Connection] = []
        self._ssl: ssl.SSLContext | None = None

    def head(self, method: str, path: str, content_type: str | None, length: int | None) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}",
                 "User-Agent: productscene", "Accept: */*"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      content_type: str | None = None, timeout: float = 60.0) -> tuple[int, dict, bytes]:
        """(status, headers with lower-case names, body). ``path``: quoted, with its query.
        OSError, asyncio.TimeoutError or HTTPConnectionError when no answer came."""
        data = self.head(method, path, content_type, None if body is None and method == "GET" else len(body or b""))
        if body:
            data += body
        while self.idle:
            conn = self.idle.pop()
            if conn.closed or conn.buf:      # closed, or sent something nobody asked for
                conn.close()
                continue
            try:
                answer = await conn.exchange(data, timeout)
            except HTTPConnectionError:
                if method != "GET" or conn.buf:
                    raise
                continue        # a kept-alive connection the server had just closed: a GET goes again
            self._keep(conn)
            return answer
        conn = await self._connect(timeout)
        answer = await conn.exchange(data, timeout)
        self._keep(conn)
        return answer

    def _keep(self, conn: _Connection) -> None:
        if not conn.closed:
            self.idle.append(conn)

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        if self.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        _, conn = await asyncio.wait_for(loop.create_connection(
            lambda: _Connection(loop), self.host, self.port, ssl=self._ssl if self.tls else None), timeout)
        return conn

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()
