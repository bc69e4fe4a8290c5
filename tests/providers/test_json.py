"""Provider JSON decoded with msgspec accepts and refuses exactly what the json module does."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.providers._json import response_json

BIG_B64 = "iVBORw0KGgo" + "A" * 1_500_000


@pytest.mark.parametrize(
    "content",
    [
        b'{"created": 1, "data": [{"b64_json": "' + BIG_B64.encode() + b'"}]}',
        b'{"seed": 18446744073709551616123}',  # wider than 64 bits
        b'{"cost": NaN}',  # the json module's extension
        '{"msg": "caf\u00e9 \u2603"}'.encode("utf-16"),  # a charset msgspec does not read
        b'{"a": 1, "a": 2}',
        b"[1, 2.5, null, true]",
    ],
    ids=["big-base64", "big-int", "nan", "utf-16", "duplicate-key", "array"],
)
def test_decodes_what_the_json_module_decodes(content: bytes) -> None:
    decoded = response_json(httpx.Response(200, content=content))
    expected = json.loads(content)
    assert repr(decoded) == repr(expected)  # repr: NaN is not equal to itself


@pytest.mark.parametrize("content", [b"", b"<html>502</html>", b'{"a": ', b"\xff\xfe\x00"], ids=["empty", "html", "truncated", "garbage"])
def test_refuses_what_is_not_json_with_a_value_error(content: bytes) -> None:
    with pytest.raises(ValueError):
        response_json(httpx.Response(200, content=content))
