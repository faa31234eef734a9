"""Results keyed by (task id, model); the detected language; windows of long texts.

One text can now hold a result from each model (re-scoring keeps the old
ones). ``lang`` is NULL on the rows stored before; ``windows`` counts the
windows a long text was scored in, and ``bertstream_windows`` holds each
window's scores. Existing rows are kept under their model.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

#: What a rollback of this revision drops (`bertstream db downgrade` shows it first).
rollback_drops = "every row but each task's latest (of any model), the long-text windows and the detected language"

TABLE = "bertstream_results"
WINDOWS = "bertstream_windows"


def _columns(pk: tuple[str, ...]) -> list[sa.Column[Any]]:
    """The results table's columns at this revision (primary key ``pk``)."""
    return [
        sa.Column("id", sa.String(128), primary_key="id" in pk),
        sa.Column("model", sa.String(256), nullable=False, primary_key="model" in pk),
        sa.Column("source", sa.String(128)),
        sa.Column("meta", sa.JSON(none_as_null=True)),
        sa.Column("text", sa.Text),
        sa.Column("text_sha256", sa.String(64), nullable=False),
        sa.Column("text_chars", sa.Integer, nullable=False),
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
    ]


OLD_COLUMNS = [c.name for c in _columns(("id",))]
INDEXED = ("source", "status", "label", "finished_at")


def _rebuild_sqlite(pk: tuple[str, ...], extra: list[sa.Column[Any]]) -> None:
    """SQLite cannot change a primary key in place: copy into a new table.

    A copy killed part-way by an older bertstream (which committed SQLite's DDL at
    once) left the new table behind: it is dropped first."""
    op.execute("DROP TABLE IF EXISTS _bertstream_results_new")
    op.create_table("_bertstream_results_new", *_columns(pk), *extra)
    names = ", ".join(OLD_COLUMNS)
    op.execute(f"INSERT INTO _bertstream_results_new ({names}) SELECT {names} FROM {TABLE}")
    op.drop_table(TABLE)
    op.rename_table("_bertstream_results_new", TABLE)
    for column in INDEXED:
        op.create_index(f"ix_{TABLE}_{column}", TABLE, [column])


def upgrade() -> None:
    bind = op.get_bind()
    new_columns: list[sa.Column[Any]] = [sa.Column("lang", sa.String(8)),
                                         sa.Column("windows", sa.Integer)]
    if bind.dialect.name == "sqlite":
        _rebuild_sqlite(("id", "model"), new_columns)
    else:
        pk = sa.inspect(bind).get_pk_constraint(TABLE)["name"] or f"{TABLE}_pkey"
        op.drop_constraint(pk, TABLE, type_="primary")
        op.create_primary_key(f"{TABLE}_pkey", TABLE, ["id", "model"])
        for column in new_columns:
            op.add_column(TABLE, column)
    op.create_index(f"ix_{TABLE}_lang", TABLE, ["lang"])
    op.create_table(
        WINDOWS,
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("window", sa.Integer, primary_key=True),
        sa.Column("start_char", sa.Integer, nullable=False),
        sa.Column("end_char", sa.Integer, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("label", sa.String(64)),
        sa.Column("score", sa.Float),
        sa.Column("scores", sa.JSON(none_as_null=True)),
    )


def downgrade() -> None:
    """Back to one row per task: of several models' rows, the latest is kept.

    The windows table and the lang index may be gone already: a rollback killed
    part-way by an older bertstream (which committed SQLite's DDL at once)."""
    inspector = sa.inspect(op.get_bind())
    if inspector.has_table(WINDOWS):
        op.drop_table(WINDOWS)
    if f"ix_{TABLE}_lang" in {ix["name"] for ix in inspector.get_indexes(TABLE)}:
        op.drop_index(f"ix_{TABLE}_lang", TABLE)
    op.execute(f"DELETE FROM {TABLE} WHERE EXISTS (SELECT 1 FROM {TABLE} AS newer "
               f"WHERE newer.id = {TABLE}.id AND (newer.finished_at > {TABLE}.finished_at OR "
               f"(newer.finished_at = {TABLE}.finished_at AND newer.model > {TABLE}.model)))")
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        _rebuild_sqlite(("id",), [])
    else:
        op.drop_constraint(f"{TABLE}_pkey", TABLE, type_="primary")
        op.create_primary_key(f"{TABLE}_pkey", TABLE, ["id"])
        op.drop_column(TABLE, "windows")
        op.drop_column(TABLE, "lang")
