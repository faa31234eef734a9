"""Alembic migrations of the results database (``bertstream db upgrade``).

``env.py`` runs them on the connection that :mod:`contract.migrate` hands
over; ``versions/`` holds one file per schema revision, each a frozen
snapshot (never the live table definition, which moves on).
"""
