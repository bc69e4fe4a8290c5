"""What a caller is told of a provider's failure: words the gateway writes.

A provider's own text can quote its key in spellings no mask knows (base64,
hex, split up), so none of it reaches a caller, a job record, a webhook or
/v1/backends. The caller gets the failure class and the provider's HTTP
status in the gateway's words; the provider's text goes to the operator's
log, masked.
"""

from __future__ import annotations

from typing import Final

from gateway.providers.base import FailureClass, ProviderError

_WHAT_HAPPENED: Final[dict[FailureClass, str]] = {
    FailureClass.UNREACHABLE: "could not be reached",
    FailureClass.REFUSED: "refused the request",
    FailureClass.REJECTED: "rejected the request",
    FailureClass.FAILED: "failed the request",
    FailureClass.UNKNOWN_OUTCOME: "did not say how the request ended",
    FailureClass.CONTENT_FILTERED: "flagged the image with its safety checker",
    FailureClass.DELIVERY_FAILED: "made the images, but they could not be delivered",
}

# What a status means, where it says more than the class does.
_STATUS_MEANS: Final[dict[int, str]] = {
    400: "invalid input",
    401: "credentials not accepted",
    402: "out of credit",
    403: "credentials not accepted",
    404: "not found",
    408: "timed out",
    409: "conflict",
    413: "input too large",
    415: "unsupported input type",
    422: "invalid input",
    429: "rate limited",
    500: "provider error",
    502: "bad gateway",
    503: "unavailable",
    504: "timed out",
}


def caller_message(backend: str, failure: FailureClass, status: int | None = None) -> str:
    """`fal refused the request (HTTP 429): rate limited`, from class and status only."""
    text = f"{backend} {_WHAT_HAPPENED.get(failure, 'failed the request')}"
    if status is not None:
        text += f" (HTTP {status})"
        if status in _STATUS_MEANS:
            text += f": {_STATUS_MEANS[status]}"
    return text


def caller_message_of(backend: str, err: ProviderError) -> str:
    """`caller_message` for a ProviderError."""
    return caller_message(backend, err.failure, err.status)
