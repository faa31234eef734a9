"""``python -m worker.healthcheck``: is a worker of this host alive? (a container's health check).

Healthy when a worker on this host (Celery node name ``…@<hostname>`` or
``…@<its first label>``, as ``--hostname NAME@%h`` / ``NAME@%n`` give; so
every child of ``--gpus`` or of several ``--model`` counts, whatever queue
family of ``BERTSTREAM_QUEUE`` it serves; another queue's worker on this host
does not) has a fresh heartbeat in Redis (contract.liveness) and, with
``--ready-file``, once that file exists: the worker has started consuming
since the file's directory was last emptied
(with ``--gpus`` or several ``--model``, the launcher creates it once every
child has created its own).
The heartbeat proves the process is alive and reaches Redis; the ready file
proves the model loaded and the consumer started. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import redis

from contract.broker import redis_client
from contract.errors import ConfigError
from contract.liveness import family_workers
from contract.settings import Settings, mask_url


def check(settings: Settings, host: str, ready_file: str | None) -> str | None:
    """None when healthy, else the reason."""
    if ready_file and not Path(ready_file).is_file():
        return f"not consuming yet ({ready_file} missing)"
    client = redis_client(settings)
    if client is None:
        return f"the broker is not Redis ({mask_url(settings.broker_url)})"
    # A node name ends in this host, or in its first label (``--hostname NAME@%n``).
    suffixes = ("@" + host, "@" + host.partition(".")[0])
    try:
        # Every queue family: a host may run one worker process per model.
        mine = [w for w in family_workers(client, settings.queue)
                if str(w.get("hostname", "")).endswith(suffixes)]
    except redis.RedisError as exc:
        return f"cannot reach Redis: {exc}"
    finally:
        client.close()
    return None if mine else f"no fresh heartbeat from a worker on {host}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.healthcheck", description=__doc__)
    parser.add_argument("--ready-file", default=None,
                        help="The worker's --ready-file; required to exist when given.")
    args = parser.parse_args(argv)
    try:
        reason = check(Settings.from_env(), socket.gethostname(), args.ready_file)
    except ConfigError as exc:
        # A setting the worker refuses too: one line, and 1 (a container health check
        # reserves 2), not a traceback in every health log entry.
        reason = str(exc)
    if reason:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
