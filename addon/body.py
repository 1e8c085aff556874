"""The bytes of a request body that routing may read, with bounded work (pure, no I/O).

Routing only reads the body; the client's bytes are forwarded as they came, encoded or not.
A body over `cap` bytes (before or after decoding) is not read for routing: parsing and
hashing it would hold up every other request, and no model takes a prompt that long. A
gzip or deflate body is inflated at most to `cap` bytes, so an 80 KB gzip bomb costs 4 MB of
work, not 80 MB; other encodings (br, zstd) are not read.
"""

from __future__ import annotations

import zlib

DEFAULT_CAP = 4 * 1024 * 1024

# Bodies larger than this (raw or to inflate) are handled off the event loop by the caller.
OFF_LOOP_BYTES = 256 * 1024


class NotRoutable(Exception):
    """The body is not read for routing; `why` says why (too-large, encoded, bad-encoding)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def needs_thread(raw: bytes, content_encoding: str) -> bool:
    return len(raw) > OFF_LOOP_BYTES or _encoding(content_encoding) != ""


def _encoding(header: str) -> str:
    enc = header.strip().lower()
    return "" if enc in ("", "identity") else enc


def routable_body(raw: bytes | None, content_encoding: str, cap: int = DEFAULT_CAP) -> bytes:
    """The decoded body, or raise NotRoutable."""
    if not raw:
        return b""
    if len(raw) > cap:
        raise NotRoutable("too-large")
    enc = _encoding(content_encoding)
    if not enc:
        return raw
    if enc in ("gzip", "x-gzip"):
        return _inflate(raw, 16 + zlib.MAX_WBITS, cap)
    if enc == "deflate":
        try:
            return _inflate(raw, zlib.MAX_WBITS, cap)  # zlib-wrapped, as the RFC says
        except NotRoutable as e:
            if e.why != "bad-encoding":
                raise
            return _inflate(raw, -zlib.MAX_WBITS, cap)  # raw deflate, as some clients send
    raise NotRoutable("encoded")


def _inflate(raw: bytes, wbits: int, cap: int) -> bytes:
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(raw, cap + 1)
    except zlib.error:
        raise NotRoutable("bad-encoding") from None
    if len(out) > cap or d.unconsumed_tail:
        raise NotRoutable("too-large")
    return out
