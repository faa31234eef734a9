"""An index on the task id in code point order, where the id's collation is not.

The dashboard's id-prefix search reads a range of ids in code point order. On
SQLite, and on PostgreSQL under a C or POSIX collation, the primary key's
index is in that order and serves the range. Under any other collation (an
ICU or a libc language locale such as en_US.UTF-8, which is what most
PostgreSQL installations get from initdb) the range is compared under
COLLATE "C", and without an index in that order each search read the whole
table. This revision adds ``id COLLATE "C"`` as an index there, and nothing
elsewhere (it would only cost writes). A rollback drops the index; no rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from contract.migrate import id_sorts_by_code_point

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: What a rollback of this revision drops (`bertstream db downgrade` shows it first).
rollback_drops = "the id index in code point order (an upgrade builds it again); no rows"

TABLE = "bertstream_results"
INDEX = f"ix_{TABLE}_id_c"


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql" or id_sorts_by_code_point(conn):
        return
    # IF NOT EXISTS: a bertstream killed part-way may have built it already.
    op.execute(sa.text(f'CREATE INDEX IF NOT EXISTS {INDEX} ON {TABLE} (id COLLATE "C")'))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.text(f"DROP INDEX IF EXISTS {INDEX}"))
