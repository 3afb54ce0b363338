"""Shared by every stage: the error taxonomy, atomic and private file writes, SQLite ledgers, clocks."""
