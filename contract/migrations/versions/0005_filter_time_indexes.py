"""Indexes on (source, finished_at, id) and (status, finished_at, id) for filtered pages.

Every page of ``results``, ``/v1/results`` and their exports is a keyset read
in ``(finished_at, id)`` order. With a source or status filter that matches a
small share of the table (the failed or expired rows, a small source) the
planner took the single-column index of that filter and sorted all its rows,
at every page: an export read each matching row once per page, so its cost
grew with the square of its rows. These indexes hand each page its rows in
order from where the last one ended. Both backends get them. They replace the
single-column indexes on source and status (revision 0001), which they serve
in full (equality lookups, counts), so a write maintains as many indexes as
before. Building them reads the table once and holds writes back meanwhile. A
rollback drops them and builds the single-column ones again; no rows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

#: What a rollback of this revision drops (`bertstream db downgrade` shows it first).
rollback_drops = ("the source and status indexes in time order (an upgrade builds them again; "
                  "the rollback builds the single-column ones back); no rows")

TABLE = "bertstream_results"
#: Index name -> the filter column it leads with.
INDEXES = {f"ix_{TABLE}_source_finished": "source", f"ix_{TABLE}_status_finished": "status"}
#: The single-column indexes of revision 0001 they replace.
REPLACED = {f"ix_{TABLE}_source": "source", f"ix_{TABLE}_status": "status"}


def upgrade() -> None:
    # IF NOT EXISTS: a bertstream killed part-way may have built one already.
    for name, column in INDEXES.items():
        op.execute(sa.text(f"CREATE INDEX IF NOT EXISTS {name} ON {TABLE} "
                           f"({column}, finished_at, id)"))
    for name in REPLACED:
        op.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))


def downgrade() -> None:
    for name, column in REPLACED.items():
        op.execute(sa.text(f"CREATE INDEX IF NOT EXISTS {name} ON {TABLE} ({column})"))
    for name in INDEXES:
        op.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))
