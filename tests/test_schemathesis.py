"""Schemathesis against the served gateway, in front of every provider's emulator.

The gateway (uvicorn on 127.0.0.1) serves its own /openapi.json; schemathesis
loads it from there and, for every operation, sends generated requests, both
schema-valid and schema-violating ones, checking each answer: never a server
error, a documented status, a documented content type, a body and headers
that match the documented schema. Bounded and repeatable: a fixed number of
examples per operation and mode, derandomized, no example database.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.emulators.launcher import EmulatorFleet
from tests.gateway_support import ServerThread, make_app, png_bytes

EXAMPLES = 40  # per operation and generation mode
CALLER_KEY = "schemathesis-caller-key-1"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance, response_headers_conformance]
# Fixed, not fuzzed: the caller's key, and a deadline long enough that a slow
# CPU never turns a valid request into a 504 (deadline abuse is in the hostile table).
FIXED_HEADERS = {"authorization": f"Bearer {CALLER_KEY}", "x-klein-deadline-ms": "60000"}
# Caller URLs as references would send the emulators (and the gateway) off the loopback
# network; a data URI stands in for each one. URL forms are in the hostile table.
STAND_IN_REFERENCE = "data:image/png;base64," + __import__("base64").b64encode(png_bytes(128, 128)).decode()


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    fleet = EmulatorFleet.start_in_thread()
    try:
        app = make_app(env={**fleet.env(), "KLEIN_GATEWAY_KEYS": CALLER_KEY})
        with ServerThread(app) as server:
            yield server.url
    finally:
        fleet.stop_thread()


def _keep_references_local(case: Any) -> Any:
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("images"), list):
        body["images"] = [STAND_IN_REFERENCE if isinstance(v, str) and not v.startswith("data:") else v for v in body["images"]]
    return case


def _fuzz(operation: Any, mode: GenerationMode, served: str, session: requests.Session, failures: list[str]) -> Counter[int]:
    """Run one operation's generated cases in one mode; returns the answers' statuses."""
    label = f"{operation.label} [{mode.value}]"
    statuses: Counter[int] = Counter()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode).map(_keep_references_local))
    def run(case: Any) -> None:
        try:
            response = case.call(base_url=served, session=session, headers=FIXED_HEADERS, timeout=60)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS, headers=FIXED_HEADERS)
        except (AssertionError, FailureGroup) as exc:  # each names every check that failed
            failures.append(f"{label}: {str(exc)[:1500]}")

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        # An operation without parameters or body has no schema-violating form to send.
    return statuses


def test_schemathesis_finds_no_server_error_and_no_nonconforming_answer(served: str, capsys: pytest.CaptureFixture[str]) -> None:
    schema = schemathesis.openapi.from_url(served + "/openapi.json")
    session = requests.Session()
    answers: dict[str, Counter[int]] = {}
    failures: list[str] = []
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            answers[f"{operation.label} [{mode.value}]"] = _fuzz(operation, mode, served, session, failures)
    elapsed = time.monotonic() - started
    total = sum(sum(c.values()) for c in answers.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} generated cases over {len(answers)} operation/mode pairs in {elapsed:.1f} s; {len(failures)} failing")
        for label, statuses in answers.items():
            shown = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items())) or "nothing to send"
            print(f"  {sum(statuses.values()):4d}  {label:42s} {shown}")
    assert not failures, "\n\n".join(failures[:10])
    assert all(answers[label] for label in answers if label.endswith("[positive]"))
    # Schema-valid requests must get through to real work, not only bounce off validation.
    assert answers["POST /v1/images/generations [positive]"][200] > 0
