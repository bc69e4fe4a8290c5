"""The usage ledger: one append-only row per request, in SQLite or PostgreSQL."""

from gateway.ledger.rows import GROUPS, UsageRow, summarise
from gateway.ledger.stores import LedgerStore, PostgresLedger, SqliteLedger, open_store
from gateway.ledger.writer import Ledger

__all__ = ["GROUPS", "Ledger", "LedgerStore", "PostgresLedger", "SqliteLedger", "UsageRow", "open_store", "summarise"]
