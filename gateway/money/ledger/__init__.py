"""The usage ledger: one append-only row per request, in SQLite or PostgreSQL."""

from gateway.money.ledger.rows import GROUPS, UsageRow, summarise
from gateway.money.ledger.stores import LedgerStore, PostgresLedger, SqliteLedger, open_store
from gateway.money.ledger.stream import LedgerStream
from gateway.money.ledger.writer import Ledger

__all__ = ["GROUPS", "Ledger", "LedgerStore", "LedgerStream", "PostgresLedger", "SqliteLedger", "UsageRow", "open_store", "summarise"]
