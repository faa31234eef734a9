"""A ``latest`` flag on each result row: is it its task's latest result?

The default views (each task's latest result, of whichever model) read the
flag instead of asking, for every row, whether the same task has a newer
row. PostgreSQL ran that question as an anti-join over the whole table
whatever the time range asked for. The upsert keeps the flag; this
revision sets it on the rows already stored (one pass over the table).
A rollback drops the column; nothing else changes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: What a rollback of this revision drops (`bertstream db downgrade` shows it first).
rollback_drops = "the latest flags (an upgrade sets them again); no rows"

TABLE = "bertstream_results"


def _has_latest() -> bool:
    """The column is there already (or still): an older bertstream, which committed
    SQLite's DDL at once, was killed part-way through this revision."""
    return "latest" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(TABLE)}


def upgrade() -> None:
    if not _has_latest():
        # A constant default: PostgreSQL adds the column without rewriting the table.
        op.add_column(TABLE, sa.Column("latest", sa.Boolean, nullable=False,
                                       server_default=sa.true()))
    # The rule the views used before this revision, once, for the rows already there.
    op.execute(f"UPDATE {TABLE} SET latest = false WHERE EXISTS (SELECT 1 FROM {TABLE} AS newer "
               f"WHERE newer.id = {TABLE}.id AND (newer.finished_at > {TABLE}.finished_at OR "
               f"(newer.finished_at = {TABLE}.finished_at AND newer.model > {TABLE}.model)))")


def downgrade() -> None:
    if _has_latest():
        op.drop_column(TABLE, "latest")
