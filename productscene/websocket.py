"""A small websocket client (RFC 6455) for ComfyUI's ``/ws`` messages; standard library only.

Enough for a listener: the opening handshake, text and binary messages (fragmented or not), pings
answered with pongs, a clean close. ``recv`` waits in short slices so another thread can stop it.
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import urllib.parse

from .errors import ProductSceneError

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_MESSAGE = 64 * 1024 * 1024


class WebSocketClosed(ProductSceneError):
    """The connection ended (closed by the server, reset, or the server is gone)."""


class WebSocket:
    def __init__(self, url: str, timeout: float = 10.0, poll: float = 0.5):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ProductSceneError(f"websocket: expected a ws:// or wss:// URL, got {url!r}")
        secure = parts.scheme == "wss"
        host, port = parts.hostname, parts.port or (443 if secure else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
            if secure:
                self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=host)
        except OSError as e:
            raise WebSocketClosed(f"websocket: cannot connect to {url}: {e}") from None
        self._buf = bytearray()
        self._closed = False
        key = base64.b64encode(os.urandom(16))
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        try:
            self.sock.sendall(request.encode())
            head = self._read_until(b"\r\n\r\n", limit=65536)
        except OSError as e:
            self.close()
            raise WebSocketClosed(f"websocket: handshake with {url} failed: {e}") from None
        status, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
        if " 101 " not in status + " " or headers.get("sec-websocket-accept") != accept:
            self.close()
            raise WebSocketClosed(f"websocket: {url} refused the upgrade ({status})")
        self.stop_requested = False  # set from another thread: recv ends within ``poll`` seconds
        self.sock.settimeout(poll)

    # ------------------------------------------------------------------ reading
    def _fill(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                if getattr(self, "stop_requested", False):
                    raise WebSocketClosed("websocket: stopped") from None
                continue
            except OSError as e:
                raise WebSocketClosed(f"websocket: connection lost: {e}") from None
            if not chunk:
                raise WebSocketClosed("websocket: the server closed the connection")
            self._buf += chunk
            return

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _read_until(self, marker: bytes, limit: int) -> bytes:
        while marker not in self._buf:
            if len(self._buf) > limit:
                raise OSError("response header too long")
            self._fill()
        i = self._buf.index(marker)
        out = bytes(self._buf[:i])
        del self._buf[:i + len(marker)]
        return out

    def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exact(8))[0]
        if n > _MAX_MESSAGE:
            raise WebSocketClosed(f"websocket: a {n}-byte frame is larger than this client accepts")
        mask = self._read_exact(4) if b1 & 0x80 else None
        payload = self._read_exact(n)
        if mask:
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv(self) -> str | bytes:
        """The next text (str) or binary (bytes) message; WebSocketClosed when the connection ends."""
        parts, kind = [], None
        while True:
            fin, opcode, payload = self._frame()
            if opcode == 0x8:  # close
                self._send(0x8, payload[:2])
                self.close()
                raise WebSocketClosed("websocket: the server closed the connection")
            if opcode == 0x9:  # ping
                self._send(0xA, payload)
                continue
            if opcode == 0xA:  # pong
                continue
            if opcode in (0x1, 0x2):
                kind, parts = opcode, [payload]
            elif opcode == 0x0 and kind is not None:
                parts.append(payload)
            else:
                raise WebSocketClosed(f"websocket: unexpected frame (opcode {opcode})")
            if fin:
                data = b"".join(parts)
                return data.decode("utf-8", "replace") if kind == 0x1 else data

    # ------------------------------------------------------------------ writing
    def _send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        try:
            self.sock.sendall(head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))
        except OSError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.sock.close()
            except OSError:
                pass
