"""What counts as a secret, and how it is masked wherever text leaves the gateway.

One registry of secret values (provider credentials, caller keys, the gateway's
own keys) and the patterns of credential-looking tokens, shared by every layer:
adapters mask provider text where it enters, logs and metrics mask what they
write. Imports nothing else of the gateway's, so any package may use it.
"""

from __future__ import annotations

import base64
import html
import re
import threading
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from typing import Final
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

REDACTED: Final = "[REDACTED]"


_TOKEN = r"[A-Za-z0-9._~+/=:\-]"
_PATTERNS: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    # Header values, whatever the scheme: `Authorization: Key abc`, JSON or repr forms.
    (re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?)[^\"'\n,}]+"), r"\1" + REDACTED),
    (re.compile(rf"(?i)\b(bearer|basic)\s+{_TOKEN}+"), r"\1 " + REDACTED),
    # `Key <fal key>`: only tokens with a digit, so prose like "Key rotation" survives.
    (re.compile(rf"\b(Key|Token)\s+(?={_TOKEN}*\d){_TOKEN}{{8,}}"), r"\1 " + REDACTED),
    # Provider key shapes.
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), REDACTED),
    (re.compile(r"\br8_[A-Za-z0-9]{8,}"), REDACTED),
    (re.compile(r"\brf_(?:live|test)_[A-Za-z0-9_\-]{4,}"), REDACTED),
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}:[0-9a-fA-F]{16,}"), REDACTED),
    # Passwords in URLs (redis://:pw@host), key-like query parameters and fields.
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
    (re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access_token|secret|password|signature|sig)=)[^&\s\"']+"), r"\1" + REDACTED),
    # A field's value: always after `=` or in quotes (`token=x`, `"password": "x"`);
    # after a bare colon only when it looks like a token, not a word, so that
    # prose such as "no credential: set FAL_KEY" keeps its instruction.
    (re.compile(r"(?i)(\b(?:api[_-]?key|secret|password|token|credential)[\"']?\s*(?:=\s*[\"']?|:\s*[\"']))[^\"'\s,}&]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)(\b(?:api[_-]?key|secret|password|token|credential)[\"']?\s*:\s*)(?=[^\"'\s,}&]*[0-9_\-./+=~])[^\"'\s,}&]+"), r"\1" + REDACTED),
)

# Every pattern above needs one of these in the text: a string without any is
# passed over without running them (most fields of a request line).
_TRIGGER: Final = re.compile(r"(?i)authoriz|bearer|basic|key|token|sk-|r8_|rf_|://|[?&]|secret|password|credential|[0-9a-f]{8}-")
# The same test for ASCII text, as substring checks of its lower-case form (a
# tenth of the regex's time on a request line). Outside ASCII, IGNORECASE also
# folds letters such as U+017F (long s) and U+212A (Kelvin), so the regex decides.
_TRIGGER_WORDS: Final = ("authoriz", "bearer", "basic", "key", "token", "sk-", "r8_", "rf_", "://", "?", "&", "secret", "password", "credential")
_HEX_DASH: Final = re.compile(r"[0-9a-fA-F]{8}-")


def _triggered(text: str) -> bool:
    """Whether `text` holds anything one of `_PATTERNS` could match (`_TRIGGER`)."""
    if not text.isascii():
        return _TRIGGER.search(text) is not None
    low = text.lower()
    for word in _TRIGGER_WORDS:
        if word in low:
            return True
    return "-" in text and _HEX_DASH.search(text) is not None


# Extra fields whose values are never written, whatever they hold.
NEVER_LOGGED_FIELDS: Final = frozenset(
    {
        "prompt",
        "negative_prompt",
        "revised_prompt",
        "authorization",
        "api_key",
        "key",
        "token",
        "secret",
        "password",
        "credential",
        "credentials",
        "b64_json",
        "image",
        "images",
    }
)
_MIN_SECRET_LEN: Final = 4  # shorter configured "secrets" would shred ordinary text
FRAGMENT_LEN: Final = 8  # this many characters of a secret count as the secret

_secrets: set[str] = set()
_secrets_by_length: tuple[str, ...] = ()  # longest first, so a secret containing another goes whole
_encoded_by_length: tuple[str, ...] = ()  # their encoded spellings (`encoded_forms`), longest first
_secrets_lock = threading.Lock()

ENCODED_MIN_LEN: Final = 8  # shorter secrets' encodings would match ordinary base64 and hex
_SEPARATORS: Final = "-_ ./"
_STRIP_SEPARATORS: Final = str.maketrans("", "", _SEPARATORS)
# base64 of a prefix of k bytes spoils this many leading characters of what follows.
_SPOILED_BY_PREFIX: Final = (0, 2, 3)


def _b64_cores(payload: bytes) -> set[str]:
    """The base64 characters (standard and url-safe) that `payload` alone
    decides, wherever in a longer string it starts (3 alignments): the
    spelling a key takes inside any base64 blob."""
    cores = set()
    for k in range(3):
        encoded = base64.b64encode(bytes(k) + payload).decode()
        core = encoded[_SPOILED_BY_PREFIX[k] : (k + len(payload)) * 8 // 6]
        cores |= {core, core.replace("+", "-").replace("/", "_")}
    return cores


@lru_cache(maxsize=256)
def encoded_forms(secret: str) -> tuple[str, ...]:
    """Spellings of `secret` a provider may echo that plain matching misses:
    base64 (standard, url-safe, padded or not, as a substring at each
    alignment) of the secret and of `Bearer <secret>` and `Key <secret>`, hex,
    and URL-encoding. Longest first; empty for secrets shorter than 8."""
    if len(secret) < ENCODED_MIN_LEN:
        return ()
    raw = secret.encode()
    forms = _b64_cores(raw)
    for payload in (raw, b"Bearer " + raw, b"Key " + raw):
        whole = base64.b64encode(payload).decode()
        forms |= {whole, whole.replace("+", "-").replace("/", "_"), whole.rstrip("=")}
    forms |= {raw.hex(), quote(secret, safe=""), quote_plus(secret, safe="")}
    forms.discard(secret)
    return tuple(sorted(forms, key=len, reverse=True))


def register_secrets(values: Iterable[str | None]) -> None:
    """Add values that must never appear in a log line, label or caller's answer.
    Their encoded spellings are worked out here, once, not on every `redact`."""
    global _secrets_by_length, _encoded_by_length
    with _secrets_lock:
        _secrets.update(v for v in values if v and len(v) >= _MIN_SECRET_LEN)
        _secrets_by_length = tuple(sorted(_secrets, key=len, reverse=True))
        encoded = {f for s in _secrets for f in encoded_forms(s)}
        _encoded_by_length = tuple(sorted(encoded, key=len, reverse=True))


def registered_secrets() -> tuple[str, ...]:
    """Every registered secret, longest first."""
    return _secrets_by_length


@lru_cache(maxsize=64)
def _lowered(secrets: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s.lower() for s in secrets)


@lru_cache(maxsize=64)
def _secret_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One case-insensitive alternation of the secrets, longest first."""
    return re.compile("|".join(re.escape(s) for s in secrets), re.IGNORECASE) if secrets else None


@lru_cache(maxsize=64)
def _stripped(secrets: tuple[str, ...]) -> tuple[str, ...]:
    """The secrets of `ENCODED_MIN_LEN` or more, lower-cased, separators dropped."""
    return tuple(t for s in secrets if len(s) >= ENCODED_MIN_LEN and len(t := s.lower().translate(_STRIP_SEPARATORS)) >= ENCODED_MIN_LEN)


@lru_cache(maxsize=64)
def _split_pattern(stripped: tuple[str, ...]) -> re.Pattern[str]:
    """Each stripped secret with any run of separators allowed between its characters."""
    gap = "[" + re.escape(_SEPARATORS) + "]*"
    return re.compile("|".join(gap.join(re.escape(c) for c in s) for s in stripped), re.IGNORECASE)


def _mask_split(text: str, secrets: tuple[str, ...]) -> str:
    """`text` with a secret written apart by separators (`r8_Xq 7Lm-2Pz.9`) masked."""
    stripped = _stripped(secrets)
    if not stripped:
        return text
    flat = text.lower().translate(_STRIP_SEPARATORS)
    if not any(s in flat for s in stripped):  # the regex only when one is there
        return text
    return _split_pattern(stripped).sub(REDACTED, text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every known secret (in any case, encoded as `encoded_forms`
    lists, or split by separators) and every credential-looking token replaced by [REDACTED]."""
    extra = [s for s in secrets if s and len(s) >= _MIN_SECRET_LEN]
    if extra:
        known = tuple(sorted(set(_secrets_by_length).union(extra), key=len, reverse=True))
        encoded = tuple(sorted({*_encoded_by_length, *(f for s in extra for f in encoded_forms(s))}, key=len, reverse=True))
    else:
        known, encoded = _secrets_by_length, _encoded_by_length
    if known:
        lowered = text.lower()
        if any(s in lowered for s in _lowered(known)) or any(s in lowered for s in _lowered(encoded)):
            pattern = _secret_pattern(tuple(sorted(known + encoded, key=len, reverse=True)))  # the regex only when one is there
            if pattern is not None:
                text = pattern.sub(REDACTED, text)
        text = _mask_split(text, known)
    if not _triggered(text):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_ESCAPE: Final = re.compile(r"\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})|\\([\"\\/])")
_MAYBE_ESCAPED: Final = re.compile(r"\\[ux\"\\/]|%[0-9a-fA-F]{2}|&#?\w+;")
_UNESCAPE_ROUNDS: Final = 4  # `\\u0041` (escaped twice) and `%255C` take more than one


def _unescape_once(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        code = m.group(1) or m.group(2)
        return chr(int(code, 16)) if code else m.group(3)

    text = _ESCAPE.sub(one, text)
    if "%" in text:
        text = unquote(text, errors="replace")
    if "&" in text:
        text = html.unescape(text)
    return text


def unescape(text: str) -> str:
    """`text` as it reads once JSON (`\\u0041`), `\\x41`, percent (`%41`) and HTML
    (`&#65;`) escapes are undone, nested ones too, with compatibility forms
    folded (fullwidth letters) and invisible format characters (zero-width
    spaces) dropped: the spelling in which a disguised key shows."""
    if text.isascii() and "\\" not in text and "%" not in text and "&" not in text:
        return text  # no escape to undo, and ASCII has nothing to fold or drop
    return _unescape_all(text)


def _unescape_all(text: str) -> str:
    for _ in range(_UNESCAPE_ROUNDS):
        if not _MAYBE_ESCAPED.search(text):
            break
        text = _unescape_once(text)
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # pair \ud83d\ude00; a lone half becomes U+FFFD
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if unicodedata.category(c) != "Cf")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`redact`, seeing through escapes: when the unescaped text holds a secret
    the redacted unescaped text is returned, otherwise `text` as `redact` leaves
    it (so ordinary `%20` or `\\n` in a log line stay as written)."""
    secrets = tuple(secrets)
    plain = unescape(text)
    if plain != text:
        cleaned = redact(plain, secrets)
        if cleaned != plain:
            return cleaned
    return redact(text, secrets)


@lru_cache(maxsize=64)
def _fragments(secrets: tuple[str, ...]) -> frozenset[str]:
    return frozenset(s[i : i + FRAGMENT_LEN] for s in secrets for i in range(len(s) - FRAGMENT_LEN + 1))


def mask_fragments(text: str, secrets: Iterable[str]) -> str:
    """`text` with every run of `FRAGMENT_LEN` or more characters that is part of
    a secret (in any letter case) replaced by [REDACTED]. Secrets shorter than
    that are left to `redact`'s whole-value match."""
    pieces = _fragments(tuple(sorted({s.lower() for s in secrets if s and len(s) >= FRAGMENT_LEN})))
    if not pieces or len(text) < FRAGMENT_LEN:
        return text
    low = text.lower()
    if len(low) != len(text):  # a few characters lower-case to two; keep positions aligned
        low = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    spans: list[list[int]] = []
    for i in range(len(low) - FRAGMENT_LEN + 1):
        if low[i : i + FRAGMENT_LEN] in pieces:
            if spans and i <= spans[-1][1]:
                spans[-1][1] = i + FRAGMENT_LEN
            else:
                spans.append([i, i + FRAGMENT_LEN])
    if not spans:
        return text
    out, at = [], 0
    for start, end in spans:
        out += [text[at:start], REDACTED]
        at = end
    out.append(text[at:])
    return "".join(out)


def looks_like_secret(value: str) -> bool:
    """True if `value` is, or contains, something `redact` would scrub."""
    return redact(value) != value


# Query parameters that carry a credential: an image URL with one is the
# provider's key or a signed grant, never to be handed to a caller.
CREDENTIAL_PARAMS: Final = frozenset(
    {
        "token",
        "key",
        "api_key",
        "apikey",
        "api-key",
        "access_token",
        "auth",
        "authorization",
        "secret",
        "password",
        "credential",
        "signature",
        "sig",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "awsaccesskeyid",
    }
)


def url_carries_credential(url: str) -> bool:
    """Whether `url` holds a credential: a key-like query parameter, a
    password, or a registered secret in any spelling `redact` knows."""
    parts = urlsplit(url)
    if parts.password:
        return True
    if any(name.lower() in CREDENTIAL_PARAMS for name, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return True
    plain = unescape(url)
    return redact(plain) != plain
