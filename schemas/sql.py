"""Text from outside (paths, metric names, values) in DuckDB SQL.

Statements take such text as bound parameters (`?`) where DuckDB allows them. View definitions do
not (a view stores its SQL), so text there goes through `literal` or `identifier`, which quote it
the way DuckDB's parser reads it back: nothing an input holds can end the literal and start SQL.
"""

from __future__ import annotations


def literal(text: str) -> str:
    """`text` as a SQL string literal (single quotes doubled; DuckDB's '...' has no other escape)."""
    return "'" + text.replace("'", "''") + "'"


def identifier(name: str) -> str:
    """`name` as a quoted SQL identifier (double quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'
