"""Safetensors files held as bytes (the store's currency): the one reader of their metadata."""

from __future__ import annotations

import json

from qfedit.errors import InvalidInputError


def metadata_of(data: bytes, where: str) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes: an 8-byte little-endian header length, then JSON.

    safetensors itself reads metadata only from a file (`safe_open`); files from the store arrive
    as bytes."""
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if len(data) < 8 or 8 + length > len(data):
        raise InvalidInputError(f"{where}: {len(data)} bytes, not a safetensors file")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError:
        raise InvalidInputError(f"{where}: the safetensors header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(metadata or {})


def check_format(data: bytes, expected: str, where: str) -> dict[str, str]:
    """The metadata of a file that must be tagged `format = expected`."""
    metadata = metadata_of(data, where)
    if metadata.get("format") != expected:
        raise InvalidInputError(f"{where}: not a {expected} file (format {metadata.get('format')!r})")
    return metadata
