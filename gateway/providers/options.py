"""An adapter's `options:` from providers.yaml, validated by name and by type.

Each adapter declares one frozen dataclass of its options, with a default for
every field, as `Adapter.options_type`. `parse()` refuses a name the dataclass
does not have and a value whose type does not match the field's annotation,
naming the option, so `klein-gateway check-config` catches a typo before the
gateway starts; `validate()` adds the rules a type cannot say (a choice among
strings, a positive number).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T", bound="AdapterOptions")

VerifySize = Literal["header", "reported", "off"]


@dataclasses.dataclass(frozen=True, slots=True)
class AdapterOptions:
    """Base of every adapter's options dataclass: the options every backend has.

    `verify_size` says how the gateway makes sure an image a provider hands
    back by URL has the size asked for, before passing that URL on:
    `header` reads only the image's first 64 KB (an HTTP Range request) and
    parses its header; `reported` trusts a width and height the provider's
    answer reports (where its protocol documents them), reading the header
    only when they are missing; `off` trusts the request. Inline (base64)
    images have their header read in any case: it is already in hand.
    """

    verify_size: VerifySize = "header"

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None, provider: str = "") -> typing.Self:
        """The options from providers.yaml; a ValueError names the bad option."""
        prefix = f"{provider}: " if provider else ""
        given = dict(options or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - fields)
        if unknown:
            known = ", ".join(sorted(fields)) or "none"
            raise ValueError(f"{prefix}unknown option(s): {', '.join(map(str, unknown))} (known: {known})")
        for name, value in given.items():
            if not conforms(value, hints[name]):
                raise ValueError(f"{prefix}option {name} must be {describe(hints[name])}, not {value!r}")
        parsed = cls(**given)
        parsed.validate(prefix)
        return parsed

    def validate(self, prefix: str) -> None:
        """Rules beyond the types; raise ValueError naming the option. `prefix` is `"<provider>: "`."""


def conforms(value: Any, annotation: Any) -> bool:
    """Does a YAML value fit a field annotation? bool is never an int here, an int is a float."""
    origin = get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in get_args(annotation))
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in get_args(annotation))
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    base = origin or annotation
    if base in (dict, Mapping) or (isinstance(base, type) and issubclass(base, Mapping)):
        return isinstance(value, Mapping)
    if base in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, base) if isinstance(base, type) else True


def describe(annotation: Any) -> str:
    """The annotation in providers.yaml words: `a number or null`, `true or false`."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(arg) for arg in get_args(annotation)))
    if origin is Literal:
        return "one of " + ", ".join("null" if a is None else str(a).lower() if isinstance(a, bool) else str(a) for a in get_args(annotation))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if annotation in names:
        return names[annotation]
    base = origin or annotation
    if base in (dict, Mapping) or (isinstance(base, type) and issubclass(base, Mapping)):
        return "a mapping"
    if base in (list, tuple):
        return "a list"
    return getattr(annotation, "__name__", str(annotation))
