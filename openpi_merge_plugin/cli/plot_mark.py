"""The proof that a picture was drawn by `inspect --plot` and is unchanged since: a sha256 in its own metadata.

The picture is drawn with `MARK` followed by 64 zeros in its metadata (PNG `Software`, PDF and SVG `Creator`: one
uncompressed text each), hashed, and the zeros replaced by that sha256 (in a PNG, the text chunk's CRC is
recomputed). A file is this command's if it holds the mark once and, with the digest put back to zeros (and that
CRC recomputed), hashes to it. Any edit of the picture, or a file that merely contains the words, fails the proof.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib

MARK = b"openpi-merge-lora inspect sha256:"
_PLACEHOLDER = b"0" * 64
_MARKED = re.compile(re.escape(MARK) + rb"([0-9a-f]{64})")
MAX_BYTES = 64 << 20  # pictures of inspect are small; a larger file is not one


def metadata_value() -> str:
    """The metadata text to draw the picture with (the digest still zeros)."""
    return (MARK + _PLACEHOLDER).decode()


def seal(data: bytes) -> bytes:
    """The drawn picture's bytes with its digest filled in."""
    found = list(_MARKED.finditer(data))
    if len(found) != 1 or found[0].group(1) != _PLACEHOLDER:
        raise ValueError("the picture does not hold the mark exactly once")
    digest = hashlib.sha256(data).hexdigest().encode()
    return _with_digest(data, found[0].start(1), digest)


def drawn_here(data: bytes) -> bool:
    """Whether `data` is a picture this command drew, unchanged since."""
    if len(data) > MAX_BYTES:
        return False
    found = list(_MARKED.finditer(data))
    if len(found) != 1:
        return False
    digest = found[0].group(1)
    try:
        drawn = _with_digest(data, found[0].start(1), _PLACEHOLDER)
    except ValueError:
        return False
    return hashlib.sha256(drawn).hexdigest().encode() == digest


def _with_digest(data: bytes, at: int, digest: bytes) -> bytes:
    """`data` with the 64 digest characters at `at` replaced (and, in a PNG, the CRC of their chunk recomputed)."""
    out = bytearray(data)
    out[at : at + 64] = digest
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        start, end = _png_chunk_around(data, at)
        out[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(out[start + 4 : end])))
    return bytes(out)


def _png_chunk_around(data: bytes, at: int) -> tuple[int, int]:
    """(offset of the chunk's length field, offset of its CRC) of the PNG chunk whose data holds byte `at`."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 8 + length
        if pos + 8 <= at < end:
            if data[pos + 4 : pos + 8] != b"tEXt" or end + 4 > len(data):
                break
            return pos, end
        pos = end + 4
    raise ValueError("the mark is not in a PNG text chunk")
