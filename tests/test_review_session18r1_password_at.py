"""An unencoded '@' in a PostgreSQL password is refused also when a '/' or '?' follows it.

The check looked for an '@' in the host SQLAlchemy reads. A password holding an '@' and,
after it, a '/' or a '?' (generated passwords hold both) put the rest of the password in
the database name or the query instead: ``u:s3cr@127.0.0.1/t0p@host/db`` connected
to a database named ``t0p@host/db`` and printed it, ``u:s3cr@db.internal?x@host/db``
looked up the host ``db.internal`` (an outage, exit 3). Both printed a piece of the
password. An '@' in a query value (``?application_name=me@x``) stays legitimate.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from contract.errors import ConfigError
from contract.settings import Settings
from producer.cli import main


@pytest.mark.parametrize("password", ["s3cr@{host}/t0pSECRET", "s3cr@SECRET.internal?x",
                                      "s3cr@SECRET/x?y", "s3cr@SECRET.internal?c=d",
                                      "s3cr@{host}/SECRET?c=d"])
def test_an_at_sign_followed_by_a_slash_or_question_mark_is_refused_unprinted(
        password: str, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    host = pg_url.rpartition("@")[2].split("/", 1)[0]
    db = pg_url.rpartition("/")[2]
    url = f"postgresql+psycopg://postgres:{password.format(host=host)}@{host}/{db}"
    monkeypatch.setenv("BERTSTREAM_DATABASE_URL", url)
    result = CliRunner().invoke(main, ["results", "--limit", "1"])
    assert result.exit_code == 2, result.output
    assert "SECRET" not in result.output
    assert "%40" in result.output


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://u:pw@h/db?application_name=me@example.org",
    "postgresql+psycopg://alice@corp:pw@h/db",
    "postgresql+psycopg://u@/db?password=a@b&host=/run/postgresql",
    "postgresql+psycopg://u:p%40ss@[::1]:5432/db",
    "postgresql+psycopg://u:ab/cd?ef@h/db",
    "postgresql:///db?host=/run/postgresql",
    "postgresql+psycopg://u:pw@h?application_name=me@example.org",
    "postgresql+psycopg://u:pw@h/db?sslrootcert=/home/me@corp/ca.pem&application_name=a@b",
    "postgresql+psycopg://u:pw@h/db?application_name=worker@host:8000",
    "postgresql+psycopg://u:pw@h:5432/db?application_name=svc@host:1234&sslmode=require",
    "postgresql+psycopg://u:pw@h/db?sslrootcert=certs/me@corp/ca.pem",
    "postgresql+psycopg://u:pw@h/db?sslcert=C:/Users/me@corp/client.crt&sslkey=k@1/c.key",
    "postgresql+psycopg://u:pw@h?passfile=.pg/me@corp/pgpass",
])
def test_urls_whose_at_signs_are_not_a_passwords_are_taken(url: str) -> None:
    Settings(database_url=url).validate()


@pytest.mark.parametrize("query", ["application_name=worker@host:8000",
                                   "sslmode=disable&sslrootcert=certs/me@corp/ca.pem"])
def test_an_at_sign_in_a_port_or_file_path_value_connects(
        query: str, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An application name ending in a port, or a relative certificate path under a
    directory holding '@', after a database: values of the user's, not a password cut
    (they were refused with exit 2, as an '@' to write %40)."""
    scheme, _, rest = pg_url.partition("://")
    user, _, where = rest.rpartition("@")
    url = f"{scheme}://{user.split(':', 1)[0]}:pw@{where}?{query}"
    monkeypatch.setenv("BERTSTREAM_DATABASE_URL", url)
    result = CliRunner().invoke(main, ["results", "--limit", "1"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://u:s3cr@h?c=d@host/db",
    "postgresql+psycopg://u:s3cr@h?c=d@host:5432/db?sslmode=require",
    "postgresql+psycopg://u:s3cr@h?c=d@host:5432",
    "postgresql+psycopg://u:s3cr@h:1?c=d@host/db",
])
def test_a_password_cut_into_a_query_value_is_refused(url: str) -> None:
    """SQLAlchemy read the host ``h`` and a query value ``d@host...``: the '@' of a
    password holding '?' and '=' after it (the host ``h`` was looked up, exit 3)."""
    with pytest.raises(ConfigError, match="%40"):
        Settings(database_url=url).validate()


def test_an_at_sign_before_the_host_is_still_refused() -> None:
    with pytest.raises(ConfigError, match="%40"):
        Settings(database_url="postgresql+psycopg://u:p@ss@h/db").validate()
