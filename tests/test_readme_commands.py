"""The README's commands work as written, and answer what the README says they answer.

A newcomer copies the README's ```bash and ```sh blocks into a shell beside
`klein-gateway serve --emulate`. So every curl in them that calls the gateway on
localhost:8080 is run, as written but for the port, against a real `serve --emulate`
process, and its answer is checked against the comment next to it: a status
(`# 400 invalid_deadline`), JSON fields (`# "chosen": "replicate"`), or, with
no comment, a 2xx. The offline `klein-gateway quote` is checked against the output
block printed under it. Every address in the README and docs/ is on port 8080 unless
it names another server, so substituting the port hides no wrong one.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway_support import REPO, clean_env, free_port

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*```(\w*)\s*$")
SHELLS = {"bash", "sh"}
GATEWAY = re.compile(r"\b(?:localhost|127\.0\.0\.1):8080\b")
ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1|0\.0\.0\.0):(\d+)")
# Addresses of servers other than the gateway's API port, each for its reason.
OTHER_SERVERS = {
    "9464": "serve --metrics-port 9464, the metrics-only port",
    "6379": "redis-server, the shared state of several workers",
    "9090": "Prometheus",
    "3000": "Grafana",
    "8090": "klein-local, the local GPU service",
}
STATUS = re.compile(r"^(\d{3})\b(?:\s+([a-z_]+))?")
FIELD = re.compile(r'"([\w-]+)":\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false|null)')
COMMAND_TIMEOUT_S = 30


@dataclass(frozen=True)
class Command:
    line: int  # where it starts in the README, for the failure message
    text: str  # the shell command, continuation lines joined
    comment: str  # what the README says it answers: its trailing comment, or the comment line after it


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    lines: list[str]


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with their language."""
    found: list[Block] = []
    current: Block | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fence = FENCE.match(line)
        if current is None and fence:
            current = Block(number + 1, fence.group(1), [])
        elif current is not None and line.strip() == "```":
            found.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
    return found


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its trailing `# comment`, a `#` inside quotes being code."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def commands(block: Block) -> Iterator[Command]:
    """Each command of a shell block with what the README says next to it."""
    pending: list[str] = []
    start = 0
    parsed: list[tuple[int, str, str]] = []
    for offset, raw in enumerate(block.lines):
        code, comment = split_comment(raw)
        if not pending:
            start = block.line + offset
        if code.endswith("\\"):
            pending.append(code[:-1].strip())
            continue
        if code:
            parsed.append((start, " ".join([*pending, code.strip()]), comment))
        elif comment and parsed and not parsed[-1][2]:  # a comment line says what the command above it answers
            parsed[-1] = (*parsed[-1][:2], comment)
        pending = []
    for line, text, comment in parsed:
        yield Command(line, text, comment)


def gateway_calls() -> list[Command]:
    return [c for b in blocks(README) if b.lang in SHELLS for c in commands(b) if c.text.startswith("curl ") and GATEWAY.search(c.text)]


def curl_part(text: str) -> str:
    """The command up to its first pipe outside quotes: the curl itself."""
    quote = ""
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "|":
            return text[:i].rstrip()
    return text


def holds(doc: Any, key: str, value: Any) -> bool:
    """Whether `key: value` appears anywhere in a JSON document."""
    if isinstance(doc, dict):
        return any((k == key and v == value) or holds(v, key, value) for k, v in doc.items())
    if isinstance(doc, list):
        return any(holds(item, key, value) for item in doc)
    return False


@dataclass(frozen=True)
class Answer:
    status: int
    body: str


def run_curl(command: Command, port: int, tmp: Path) -> Answer:
    """Run the command's curl, port substituted, keeping the status and the body apart."""
    body = tmp / "body"
    text = GATEWAY.sub(lambda m: m.group(0).replace("8080", str(port)), curl_part(command.text))
    proc = subprocess.run(["bash", "-c", f"{text} -o {body} -w '%{{http_code}}'"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=clean_env(KEY=""), check=False)
    assert proc.returncode == 0, f"README line {command.line}: {command.text}\n{proc.stderr}"
    raw = body.read_bytes().decode(errors="replace")  # not read_text: it would turn \r\n into \n
    if raw.startswith("HTTP/"):  # curl -i: the headers lead the body
        raw = raw.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in raw else ""
    return Answer(int(proc.stdout.strip()[-3:]), raw)


def check(command: Command, answer: Answer) -> None:
    where = f"README line {command.line}: {command.text}\nanswered {answer.status}: {answer.body[:500]}"
    status = STATUS.match(command.comment)
    if status:
        assert answer.status == int(status.group(1)), where
        if status.group(2):
            assert json.loads(answer.body)["error"]["code"] == status.group(2), where
    else:
        assert 200 <= answer.status < 300, where
    fields = FIELD.findall(command.comment)
    if fields:
        doc = json.loads(answer.body)
        for key, value in fields:
            assert holds(doc, key, json.loads(value)), f"{where}\nno {key}: {value} in the answer"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`klein-gateway serve --emulate` on a free port, as command 1 of the README runs it."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    workdir = tmp_path_factory.mktemp("readme")
    port = free_port()
    env = clean_env(PYTHONPATH=str(REPO), KLEIN_USAGE_LEDGER=":memory:")
    log = (workdir / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--emulate", "--workers", "1", "--port", str(port), "--config", str(REPO / "providers.yaml"), "--pricing", str(REPO / "pricing")],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (workdir / "serve.log").read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve --emulate was not ready within 60 s"
            time.sleep(0.2)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


CALLS = gateway_calls()
RUNNABLE = [c for c in CALLS if "..." not in c.text]  # a placeholder (imgjob_...) is for the reader to fill in


def test_the_readme_has_gateway_calls_to_check() -> None:
    assert len(RUNNABLE) >= 6, [c.text for c in CALLS]
    assert sum(bool(c.comment) for c in RUNNABLE) >= 4, "most calls say what they answer"


@pytest.mark.parametrize("command", RUNNABLE, ids=[f"line-{c.line}" for c in RUNNABLE])
def test_each_readme_call_answers_as_the_readme_says(gateway: int, command: Command, tmp_path: Path) -> None:
    check(command, run_curl(command, gateway, tmp_path))


@pytest.mark.parametrize("command", RUNNABLE, ids=[f"line-{c.line}" for c in RUNNABLE])
def test_each_readme_call_runs_as_written_with_its_pipes(gateway: int, command: Command) -> None:
    text = GATEWAY.sub(lambda m: m.group(0).replace("8080", str(gateway)), command.text)
    proc = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=clean_env(KEY=""), check=False)
    assert proc.returncode == 0 and proc.stdout.strip(), f"README line {command.line}: {command.text}\n{proc.stderr}"


def quote_examples() -> list[tuple[Command, list[str]]]:
    """Each README `klein-gateway quote` command, with the output block printed right under it."""
    found = []
    shown = blocks(README)
    for block, after in itertools.pairwise(shown):
        if block.lang in SHELLS and after.lang == "":
            for command in commands(block):
                if command.text.startswith("klein-gateway quote "):
                    found.append((command, after.lines))
    return found


def test_the_readme_shows_a_quote_with_its_output() -> None:
    assert quote_examples(), "the README shows `klein-gateway quote` with what it prints"


@pytest.mark.parametrize("command,printed", quote_examples(), ids=[f"line-{c.line}" for c, _ in quote_examples()])
def test_the_offline_quote_prints_what_the_readme_shows(command: Command, printed: list[str], tmp_path: Path) -> None:
    args = command.text.split()[1:]
    env = clean_env(PYTHONPATH=str(REPO))
    for name in ("KLEIN_LOCAL_URL", "KLEIN_PUBLIC_BASE_URL", "KLEIN_CONFIG", "KLEIN_PRICING"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr
    assert [line.rstrip() for line in proc.stdout.splitlines()] == [line.rstrip() for line in printed]


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_every_example_address_is_on_port_8080_unless_it_names_another_server(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    wrong = [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in ADDRESS.finditer(text) if m.group(1) not in {"8080", *OTHER_SERVERS}]
    assert not wrong, f"{path.name}: the gateway's default port is 8080: {wrong}"
    ports = re.findall(r"klein-gateway serve[^\n`]*--port[ =](\d+)", text)
    assert set(ports) <= {"8080"}, f"{path.name}: serve --port other than 8080: {ports}"


@pytest.mark.parametrize(
    "comment,status,body,passes",
    [
        ("400 invalid_deadline", 400, '{"error": {"code": "invalid_deadline"}}', True),
        ("400 invalid_deadline", 422, '{"error": {"code": "invalid_deadline"}}', False),
        ("400 invalid_deadline", 400, '{"error": {"code": "invalid_size"}}', False),
        ('"chosen": "replicate", "chosen_size": "1365x768"', 200, '{"chosen": "replicate", "chosen_size": "1365x768"}', True),
        ('"chosen": "replicate"', 200, '{"chosen": "fal"}', False),
        ('"size": "1365x768"', 200, '{"backends": [{"name": "replicate", "size": "1365x768"}]}', True),
        ("", 202, "{}", True),
        ("", 500, "{}", False),
    ],
)
def test_the_check_fails_an_answer_unlike_the_readme(comment: str, status: int, body: str, passes: bool) -> None:
    command = Command(1, "curl -s localhost:8080/x", comment)
    if passes:
        check(command, Answer(status, body))
    else:
        with pytest.raises(AssertionError):
            check(command, Answer(status, body))


def test_comments_and_continuations_are_read_as_a_reader_would() -> None:
    block = Block(10, "bash", ['curl -s localhost:8080/a -d \'{"a": "#x"}\' \\', "  -H 'x: y'   # 400 bad", "curl -s localhost:8080/b | head", '# "chosen": "local"'])
    assert list(commands(block)) == [
        Command(10, "curl -s localhost:8080/a -d '{\"a\": \"#x\"}' -H 'x: y'", "400 bad"),
        Command(12, "curl -s localhost:8080/b | head", '"chosen": "local"'),
    ]
    assert curl_part("curl -s 'a|b' | python3 -m json.tool") == "curl -s 'a|b'"
