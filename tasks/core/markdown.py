"""Markdown for Prefect artifacts: a value made safe for one table cell."""

from __future__ import annotations


def cell(text: str) -> str:
    """``text`` in a Markdown table cell: its pipes escaped, its line breaks made spaces."""
    return text.replace("|", "\\|").replace("\n", " ")
