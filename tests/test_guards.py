"""The three fast paths that rely on library internals: each one is in use, or a test fails.

pyproject.toml bounds kombu, SQLAlchemy and transformers from above because
of these; when a new release changes an internal, these tests say so instead
of the fast path silently switching off.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from contract.results import ResultStore


def test_kombu_patch_applies_to_this_kombu() -> None:
    from kombu.transport import redis as kredis

    from worker import kombu_redis

    assert kombu_redis.install() is True
    assert kredis.Channel.conn_or_acquire.__module__ == "worker.kombu_redis"
    assert kredis.QoS.ack.__module__ == "worker.kombu_redis"
    assert kredis.QoS.append.__module__ == "worker.kombu_redis"
    assert kredis.Channel._brpop_start is kombu_redis._receive_start
    assert kredis.Channel._brpop_read is kombu_redis._receive_read


def test_bulk_writer_path_is_available(tmp_path: Path) -> None:
    store = ResultStore.from_url(f"sqlite:///{tmp_path / 'g.db'}")
    try:
        assert store._writer() is not None
    finally:
        store.close()


def test_runner_finds_the_fast_tokenizer_backend(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert tok.is_fast and tok.backend_tokenizer.to_str()


def test_the_client_never_patches_kombu() -> None:
    """A web app importing the client and publishing keeps kombu as shipped."""
    code = (
        "from contract.settings import Settings\n"
        "from producer.client import Client\n"
        "import sys\n"
        "c = Client(Settings(broker_url='memory://', database_url='sqlite://'))\n"
        "c.submit('hello')\n"
        "c.close()\n"
        "from kombu.transport import redis as r\n"
        "assert 'worker.kombu_redis' not in sys.modules\n"
        "assert r.Channel.conn_or_acquire.__module__ == 'kombu.transport.redis'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
