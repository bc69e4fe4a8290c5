"""The shared meaning of an HTTP error status, and where each adapter departs from it.

The table is policy: a row changed here is a change in what the gateway bills
and how a backend's health moves. Each adapter's departures are listed row by
row; every other status must come out of the adapter as the table says.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from gateway.providers._wire import STATUS_CLASSES, SUBMITTED_STATUS_CLASSES, classify_status, http_error
from gateway.providers.base import Adapter, AdapterSettings, FailureClass, ProviderError
from gateway.providers.empiriolabs import EmpirioLabsAdapter
from gateway.providers.fal import FalAdapter
from gateway.providers.local import LocalAdapter
from gateway.providers.replicate import ReplicateAdapter
from gateway.providers.runflow import RunflowAdapter

REFUSED, REJECTED, FAILED, UNKNOWN = FailureClass.REFUSED, FailureClass.REJECTED, FailureClass.FAILED, FailureClass.UNKNOWN_OUTCOME

# Every status class the adapters meet, and a few no table names.
STATUSES = (400, 401, 402, 403, 404, 408, 409, 413, 415, 418, 422, 425, 429, 451, 500, 501, 502, 503, 504, 507, 599)

# status: (before a submit, once the work is submitted)
SHARED_TABLE: dict[int, tuple[FailureClass, FailureClass]] = {
    400: (REJECTED, REJECTED),
    401: (REFUSED, REFUSED),
    402: (REFUSED, REFUSED),
    403: (REFUSED, REFUSED),
    404: (REJECTED, REJECTED),
    408: (FAILED, UNKNOWN),
    409: (REJECTED, REJECTED),
    413: (REJECTED, REJECTED),
    415: (REJECTED, REJECTED),
    418: (FAILED, FAILED),
    422: (REJECTED, REJECTED),
    425: (FAILED, FAILED),
    429: (REFUSED, REFUSED),
    451: (FAILED, FAILED),
    500: (FAILED, FAILED),
    501: (FAILED, FAILED),
    502: (FAILED, FAILED),
    503: (REFUSED, REFUSED),
    504: (FAILED, UNKNOWN),
    507: (FAILED, FAILED),
    599: (FAILED, FAILED),
}


def _response(status: int, body: object = None, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={} if body is None else body, headers=headers, request=httpx.Request("POST", "https://provider.test/x"))


@pytest.mark.parametrize("submitted", [False, True], ids=["before_submit", "submitted"])
@pytest.mark.parametrize("status", STATUSES)
def test_the_shared_table_classifies_each_status(status: int, submitted: bool) -> None:
    assert classify_status(status, submitted=submitted) is SHARED_TABLE[status][submitted]


def test_the_table_names_only_error_statuses() -> None:
    """A success never reaches it: adapters classify only answers of 400 and up (or a redirect they refused to follow)."""
    assert all(status >= 400 for status in (*STATUS_CLASSES, *SUBMITTED_STATUS_CLASSES))


@pytest.mark.parametrize(
    ("status", "submitted", "billed", "credentials_invalid"),
    [
        (400, False, False, False),
        (400, True, False, False),
        (401, False, False, True),
        (403, True, False, True),
        (402, False, False, False),
        (408, False, False, False),
        (408, True, True, False),  # the work may have run: assume it billed
        (429, True, False, False),
        (500, True, False, False),
        (503, False, False, False),
        (504, False, False, False),
        (504, True, True, False),
    ],
)
def test_http_error_sets_billed_and_credentials_by_the_table(status: int, submitted: bool, billed: bool, credentials_invalid: bool) -> None:
    error = http_error(_response(status), "boom", submitted=submitted)
    assert (error.failure, error.billed, error.credentials_invalid) == (SHARED_TABLE[status][submitted], billed, credentials_invalid)
    assert (error.status, error.message) == (status, f"HTTP {status}: boom")


@pytest.mark.parametrize(("header", "retry_after"), [({"retry-after": "7"}, 7.0), ({}, None), ({"retry-after": "soon"}, None)])
def test_http_error_honours_retry_after(header: dict[str, str], retry_after: float | None) -> None:
    assert http_error(_response(429, **header), "slow down").retry_after == retry_after


def test_a_job_id_means_submitted_unless_told_otherwise() -> None:
    assert http_error(_response(504), "late", job_id="job-1").failure is UNKNOWN
    assert http_error(_response(504), "late", job_id="job-1", submitted=False).failure is FAILED
    assert http_error(_response(504), "late").failure is FAILED


def test_an_override_wins_over_the_table_and_an_explicit_billed_over_its_default() -> None:
    error = http_error(_response(404), "gone", overrides={404: FAILED}, billed=True)
    assert (error.failure, error.billed) == (FAILED, True)
    assert classify_status(503, submitted=True, overrides={404: FAILED}) is REFUSED  # only the statuses named


# ---- each adapter's departures ------------------------------------------------

# How each adapter turns an error answer into a ProviderError: (adapter, submitted) -> call.
ErrorPath = Callable[[Adapter, httpx.Response], ProviderError]
ERROR_PATHS: dict[tuple[str, bool], ErrorPath] = {
    ("fal", False): lambda a, r: a._error(r),  # type: ignore[attr-defined]
    ("fal", True): lambda a, r: a._error(r, job_id="req-1"),  # type: ignore[attr-defined]
    ("replicate", False): lambda a, r: a._error(r),  # type: ignore[attr-defined]
    ("replicate", True): lambda a, r: a._error(r, job_id="pred-1"),  # type: ignore[attr-defined]
    ("runflow", False): lambda a, r: a._create_error(r),  # type: ignore[attr-defined]
    ("runflow", True): lambda a, r: a._http_error(r, "run-1"),  # type: ignore[attr-defined]
    ("empiriolabs", True): lambda a, r: a._error(r),  # type: ignore[attr-defined]  # the one call is the work
}
ADAPTERS: dict[str, type[Adapter]] = {"fal": FalAdapter, "replicate": ReplicateAdapter, "runflow": RunflowAdapter, "empiriolabs": EmpirioLabsAdapter}

# (adapter, submitted, status) -> (class, billed) where the adapter departs from the table.
OVERRIDES: dict[tuple[str, bool, int], tuple[FailureClass, bool]] = {
    ("fal", False, 404): (FAILED, False),  # the endpoint id, not the input
    ("fal", True, 503): (FAILED, False),  # the job's known end; 5xx is never charged
    ("fal", True, 504): (FAILED, False),
    ("replicate", False, 404): (FAILED, False),  # the model path, not the input
    ("runflow", False, 404): (FAILED, False),  # the model path, not the input
}


def _adapter(kind: str, client: httpx.AsyncClient, make_settings: Callable[..., AdapterSettings]) -> Adapter:
    return ADAPTERS[kind](make_settings(kind, "https://provider.test", "test-key-not-secret"), client)


def _expected_billed(kind: str, submitted: bool, status: int, failure: FailureClass) -> bool:
    if kind == "fal" and submitted:
        return status < 500  # fal FAQ: a 4xx after the job ran may be charged, a 5xx never
    return failure is UNKNOWN


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize(("kind", "submitted"), list(ERROR_PATHS), ids=[f"{k}-{'submitted' if s else 'before_submit'}" for k, s in ERROR_PATHS])
async def test_each_adapter_follows_the_table_except_where_it_overrides(kind: str, submitted: bool, status: int, http_client, make_settings) -> None:
    error = ERROR_PATHS[kind, submitted](_adapter(kind, http_client, make_settings), _response(status))
    failure, billed = OVERRIDES.get((kind, submitted, status), (SHARED_TABLE[status][submitted], None))
    assert error.failure is failure
    assert error.billed is (billed if billed is not None else _expected_billed(kind, submitted, status, failure))
    assert error.credentials_invalid is (status in (401, 403))


async def test_fal_start_deadline_504_is_failed_and_not_billed_even_after_submit(http_client, make_settings) -> None:
    error = _adapter("fal", http_client, make_settings)._error(_response(504, **{"x-fal-request-timeout-type": "user"}), job_id="req-1")  # type: ignore[attr-defined]
    assert (error.failure, error.billed, error.code) == (FAILED, False, "request_timeout")


@pytest.mark.parametrize("status", [408, 504])
async def test_empiriolabs_documented_code_beats_a_timeout_status(status: int, http_client, make_settings) -> None:
    body = {"error": {"code": "upstream_error", "message": "upstream broke"}}
    error = _adapter("empiriolabs", http_client, make_settings)._error(_response(status, body))  # type: ignore[attr-defined]
    assert (error.failure, error.billed) == (FAILED, False)


@pytest.mark.parametrize(("status", "failure"), [(408, FAILED), (504, FAILED), (503, REFUSED), (422, REJECTED)])
async def test_local_timeout_statuses_mean_the_work_never_started(status: int, failure: FailureClass, http_client, make_settings, mock, make_job, deadline) -> None:
    """The local service answers 504 for a request it dropped before its batch: FAILED, not billed."""
    adapter = LocalAdapter(make_settings("local", "http://127.0.0.1:9", None), http_client)
    mock.post("http://127.0.0.1:9/v1/images/generations").respond(status, json={"error": {"code": "x", "message": "no"}})
    with pytest.raises(ProviderError) as caught:
        await adapter.generate(make_job(), deadline)
    assert (caught.value.failure, caught.value.billed) == (failure, False)
