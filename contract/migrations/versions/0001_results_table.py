"""The results table as bertstream 0.1 created it (the baseline).

Databases created before migrations existed already hold this table: the
upgrade adopts it as it is, rows kept, and only stamps the revision.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

#: What a rollback of this revision drops (`bertstream db downgrade` shows it first).
rollback_drops = "the results table, with every row"

TABLE = "bertstream_results"
INDEXED = ("source", "status", "label", "finished_at")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table(TABLE):
        op.create_table(
            TABLE,
            sa.Column("id", sa.String(128), primary_key=True),
            sa.Column("source", sa.String(128)),
            sa.Column("meta", sa.JSON(none_as_null=True)),
            sa.Column("text", sa.Text),
            sa.Column("text_sha256", sa.String(64), nullable=False),
            sa.Column("text_chars", sa.Integer, nullable=False),
            sa.Column("model", sa.String(256), nullable=False),
            sa.Column("model_revision", sa.String(64)),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("label", sa.String(64)),
            sa.Column("score", sa.Float),
            sa.Column("scores", sa.JSON(none_as_null=True)),
            sa.Column("error", sa.Text),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("truncated", sa.Boolean, nullable=False),
            sa.Column("tokens", sa.Integer),
            sa.Column("batch_size", sa.Integer),
            sa.Column("worker", sa.String(256)),
            sa.Column("submitted_at", sa.DateTime(timezone=True)),
            sa.Column("started_at", sa.DateTime(timezone=True)),
            sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        )
    present = {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes(TABLE)}
    for column in INDEXED:
        name = f"ix_{TABLE}_{column}"
        if name not in present:
            op.create_index(name, TABLE, [column])


def downgrade() -> None:
    op.drop_table(TABLE)
