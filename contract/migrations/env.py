"""Alembic's environment: migrate the connection :mod:`contract.migrate` passes in.

There is no ``alembic.ini``: ``bertstream db`` builds the configuration in
code, with the database URL from the settings (never from a file).
"""

from __future__ import annotations

from alembic import context

from contract.constants import MIGRATIONS_TABLE
from contract.results import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=MIGRATIONS_TABLE,
    # SQLite alters tables by copying them ("batch" mode).
    render_as_batch=connection.dialect.name == "sqlite",
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
