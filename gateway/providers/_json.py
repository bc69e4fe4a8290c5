"""Provider JSON, decoded with msgspec.

`httpx.Response.json()` decodes the body to text and then parses it with the
standard json module, copying a megabyte of base64 twice on the way; msgspec
parses the bytes directly, in C, several times faster. A body msgspec refuses
(a charset other than UTF-8, NaN, a number too big for it) is handed to the
standard module, so what is accepted and refused is exactly what it was.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from gateway.net.wire import WireResponse

_decode = msgspec.json.Decoder().decode
encode_json = msgspec.json.Encoder().encode  # compact UTF-8, as httpx's `json=` wrote it


def response_json(response: WireResponse) -> Any:
    """The response's JSON body; ValueError if it is not JSON."""
    try:
        return _decode(response.content)
    except msgspec.DecodeError:
        return json.loads(response.content)
