"""The Celery application both sides build from settings: names, routes, JSON only.

The producer uses it to publish; the worker registers its tasks on it. Celery's
result backend is disabled: results live in our own table.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from celery import Celery
from kombu import Exchange, Queue
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel
from redis.backoff import NoBackoff
from redis.retry import Retry

from contract.constants import ENV_PREFIX, LANE_BULK, LANE_INTERACTIVE, TASK_ANALYZE, queue_name
from contract.errors import BrokerMisconfigured as BrokerMisconfigured  # re-exported
from contract.errors import BrokerUnavailable, ConfigError, causes
from contract.settings import MEMORY_BROKER, REDIS_SCHEMES, Settings, mask_url

#: What Redis answers when a URL selects a database index past its ``databases`` setting.
DB_INDEX_OUT_OF_RANGE = "DB index is out of range"


def make_celery(settings: Settings, *, name: str = "bertstream") -> Celery:
    """A Celery app for ``settings``: JSON only, no result backend, late acks.

    Queues: ``<queue>.interactive`` (single submits) and ``<queue>.bulk``
    (chunks from streams), both consumed by every worker. Redis connections
    time out (``redis_*`` settings) and are health-checked; publishes are
    retried with a bounded backoff (``publish_retries``, ``publish_retry_max_s``).
    Celery's remote control is off unless ``remote_control`` is set.
    """
    broker_url, vhost = celery_broker_url(settings.broker_url)
    app = Celery(name, broker=broker_url, set_as_current=False)
    lanes = [queue_name(settings.family, lane) for lane in (LANE_INTERACTIVE, LANE_BULK)]
    exchange = Exchange(settings.queue, type="direct")
    conf: dict[str, Any] = {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_queues": [Queue(q, exchange, routing_key=q) for q in lanes],
        "task_default_exchange": settings.queue,
        "task_default_queue": lanes[0],
        "task_routes": {TASK_ANALYZE: {"queue": lanes[0]}},
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # Messages a worker held when its connection broke sit in kombu's
            # unacked index until a sweep finds them past the visibility
            # timeout; kombu's default sweep runs about every 100 s.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 5)),
            "unacked_restore_throttle": 1,
            **redis_socket_options(settings),
        },
        "broker_connection_retry_on_startup": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": publish_retry_policy(settings),
        "worker_enable_remote_control": settings.remote_control,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "enable_utc": True,
    }
    if vhost is not None:
        conf["broker_vhost"] = vhost
    if settings.broker_url.startswith(MEMORY_BROKER):
        # The in-memory transport polls; its default 1 s would dominate latency.
        conf["broker_transport_options"]["polling_interval"] = 0.01
    app.conf.update(conf)
    return app


def celery_broker_url(url: str) -> tuple[str, str | None]:
    """``url`` as Celery's Redis transport (kombu) takes it, and the database index to give
    it apart (None: the URL's own). kombu has no ``unix://`` transport (it failed with
    ``No such transport: unix``): a socket is its ``redis+socket://`` and the database
    its virtual host, where redis-py reads ``unix:///path?db=N``."""
    if not url.startswith("unix://"):
        return url, None
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    db = next((value for key, value in query if key == "db"), "0")
    rest = urlencode([(key, value) for key, value in query if key != "db"])
    # Not urlunsplit: it drops the "//" of an empty host (redis+socket:/path, no socket).
    return f"redis+socket://{parts.netloc}{parts.path}{'?' if rest else ''}{rest}", db


def broker_error(settings: Settings, exc: BaseException) -> BrokerMisconfigured | BrokerUnavailable:
    """The error a Redis failure ``exc`` (redis-py's, or kombu's around it) stands for.

    :class:`BrokerMisconfigured` (a :class:`ConfigError`) when Redis answered but refused
    what the URL asks (a database index past the server's ``databases``, a wrong or
    missing password): a setting to fix (exit 2), not a server to start. Otherwise
    :class:`BrokerUnavailable` (exit 3), which says so when Redis is up but full
    (:func:`redis_full`) or silent (:func:`redis_silent`): "cannot reach Redis ... start
    it" sent the reader to a server that runs.
    """
    url = mask_url(settings.broker_url)
    if redis_full(exc):
        return BrokerUnavailable(f"Redis at {url} is full (used memory above its maxmemory) "
                                 f"and refuses writes: retry once the workers drain the "
                                 f"queue, or raise its maxmemory")
    for cause in causes(exc):
        problem = None
        if isinstance(cause, redis.ResponseError) and DB_INDEX_OUT_OF_RANGE in str(cause):
            problem = (f"database index {_url_db(settings.broker_url)} is out of range for "
                       f"the Redis server there (it has fewer databases: its `databases` "
                       f"setting)")
        elif isinstance(cause, redis.AuthenticationError):
            problem = f"the Redis server there refused the credentials ({cause})"
        if problem is not None:
            return BrokerMisconfigured(f"{ENV_PREFIX}BROKER_URL={url!r}: {problem}", problem)
    if redis_silent(exc):
        return BrokerUnavailable(
            f"cannot reach Redis at {url}: it took the connection but did not answer "
            f"within {settings.redis_socket_timeout_s:g} s (paused, busy with a long command "
            f"or script, or overloaded): retry later, or raise "
            f"{ENV_PREFIX}REDIS_SOCKET_TIMEOUT_S ({exc})")
    return BrokerUnavailable(f"cannot reach Redis at {url}: start it with `redis-server` "
                             f"or set {ENV_PREFIX}BROKER_URL ({exc})")


def redis_silent(exc: BaseException) -> bool:
    """Whether ``exc`` (or one of its causes) is a Redis that took the connection and did
    not answer in time (``CLIENT PAUSE``, a long script, an overloaded server): a server
    that runs, which "start it" would send the reader to restart (losing, without
    persistence, its queue). A connect that timed out is not one (no server answered)."""
    return any(isinstance(cause, redis.exceptions.TimeoutError)
               and "connecting" not in str(cause) for cause in causes(exc))


def redis_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or one of its causes) is Redis out of reach: a refused, dropped or
    silent connection, or a server still loading its data after a restart."""
    return any(isinstance(cause, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))
               for cause in causes(exc))


def redis_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or one of its causes) is a full noeviction Redis refusing a write
    (``OOM command not allowed when used memory > 'maxmemory'``)."""
    return any(isinstance(cause, redis.exceptions.OutOfMemoryError) for cause in causes(exc))


#: The key :func:`probe_broker` writes (for a millisecond) to learn that Redis takes writes.
PROBE_KEY = "bertstream:probe"


def probe_broker(settings: Settings, timeout_s: float | None = None, *,
                 needs_scripts: bool = False) -> None:
    """One try at the broker's Redis now, without redis-py's retries, each socket wait cut
    to ``timeout_s``: returns when it answers (and at once for a broker other than Redis);
    raises :func:`broker_error`'s error when it does not (:class:`BrokerMisconfigured`,
    :class:`BrokerUnavailable`), and :class:`ConfigError` for a URL that does not parse.
    ``needs_scripts``: also run a trivial script, and raise :class:`ConfigError` when
    Redis refuses scripts (:func:`refuses_scripts`), which a worker cannot run without;
    and write a key that expires at once (:data:`PROBE_KEY`), so that a full Redis
    (:func:`redis_full`) is :class:`BrokerUnavailable` here, not an OOM reply out of
    Celery's start (a traceback, exit 1).
    """
    if not settings.broker_url.startswith(REDIS_SCHEMES):
        return
    options = redis_socket_options(settings)
    if timeout_s is not None:
        options.update(socket_connect_timeout=min(settings.redis_connect_timeout_s, timeout_s),
                       socket_timeout=min(settings.redis_socket_timeout_s, timeout_s))
    try:
        client = redis.Redis.from_url(settings.broker_url, retry=Retry(NoBackoff(), 0),
                                      **options)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}BROKER_URL={mask_url(settings.broker_url)!r} cannot "
                          f"be parsed ({exc})") from exc
    try:
        client.ping()
        if needs_scripts:
            client.eval("return 1", 0)
            try:
                client.set(PROBE_KEY, b"1", px=1)
            except redis.exceptions.OutOfMemoryError:
                raise
            except redis.ResponseError:  # an ACL that keeps this key apart: no OOM news
                pass
    except redis.RedisError as exc:
        if needs_scripts and refuses_scripts(exc):
            raise ConfigError(
                f"Redis at {mask_url(settings.broker_url)} refuses Lua scripts ({exc}): a "
                f"worker needs them (kombu's visibility restore releases its lock with one, "
                f"whatever {ENV_PREFIX}ATOMIC_RECEIVE says); grant the URL's user "
                f"+@scripting (ACL SETUSER <user> +@scripting) or use a server with Lua"
            ) from exc
        raise broker_error(settings, exc) from exc
    finally:
        client.close()


#: Tries of :func:`watched` before it gives up on keys that keep changing.
WATCH_TRIES = 16

T = TypeVar("T")


def watched(client: redis.Redis, keys: list[str], step: Callable[[Any, list[Any]], T],
            tries: int = WATCH_TRIES) -> T:
    """Read ``keys`` and queue ``step(pipe, values)``'s writes in one WATCH/MULTI
    transaction, again while one of the keys changes meanwhile: what it writes is decided
    on values no other client changed, as inside a script (for a Redis that refuses
    scripts). Gives ``step``'s result; raises :class:`redis.WatchError` when the keys
    kept changing through ``tries`` tries."""
    with client.pipeline() as pipe:
        for attempt in range(tries):
            try:
                pipe.watch(*keys)
                values = pipe.mget(keys)
                pipe.multi()
                out = step(pipe, values)
                pipe.execute()
                return out
            except redis.WatchError:
                if attempt == tries - 1:
                    raise
    raise redis.WatchError(f"no try of {tries}")


def refuses_scripts(exc: redis.RedisError) -> bool:
    """Whether ``exc``, raised running a script, is Redis refusing scripts as such: an ACL
    user without ``+@scripting`` (NOPERM), a server without Lua (EVALSHA, EVAL or SCRIPT
    an unknown command), or a script it will not keep (NOSCRIPT once loaded). Not a
    connection error, nor an error of the script's own commands."""
    text = str(exc).lower()
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return "command" in text  # not a key the ACL user may not read
    return isinstance(exc, redis.exceptions.NoScriptError) or (
        isinstance(exc, redis.ResponseError)
        and ("unknown command" in text or "noscript" in text))


class ScriptSwitch:
    """Runs a Redis script until Redis refuses scripts (:func:`refuses_scripts`), then its
    fallback of plain commands, for good. The switch is logged once, on ``logger``, as
    "Redis refuses scripts (<the refusal>): <what>", ``what`` saying what is done instead.
    One per owner: the claims, retry markers and drops of an API server share one, so the
    switch is logged once per process. Thread-safe."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log, self._what = logger, what
        self._lock = threading.Lock()
        #: False once Redis refused a script: the fallbacks run from then on.
        self.scripted = True

    def run(self, script: Callable[[], T], fallback: Callable[[], T]) -> T:
        """``script()``, or ``fallback()`` once Redis refused a script (this time or
        before). Any other error of the script is raised."""
        if self.scripted:
            try:
                return script()
            except redis.RedisError as exc:
                if not refuses_scripts(exc):
                    raise
                with self._lock:
                    first, self.scripted = self.scripted, False
                if first:
                    self._log.warning("Redis refuses scripts (%s): %s", exc, self._what)
        return fallback()


def _url_db(url: str) -> str:
    """The database index a (valid) Redis URL selects."""
    if url.startswith("unix://"):
        return celery_broker_url(url)[1] or "0"
    return urlsplit(url).path.strip("/") or "0"


def redis_socket_options(settings: Settings) -> dict[str, Any]:
    """Timeouts, keepalive and health checks of every Redis connection (kombu's and ours).

    No TCP keepalive on a unix socket: redis-py's socket connection refuses the option
    (a TypeError at the first command).
    """
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": settings.redis_health_check_s,
    }
    if settings.broker_url.startswith("unix://"):
        del options["socket_keepalive"]
    return options


def publish_retry_policy(settings: Settings) -> dict[str, Any]:
    """kombu's retry policy for a publish: no pause first, then 0.25 s more per retry,
    capped at ``publish_retry_max_s``. A connection Redis refuses for the URL's sake (a
    database index, credentials: :class:`BrokerMisconfigured`) is not retried: its
    ``errback``, which kombu calls on each failed try, raises that error at once."""

    def refuse_misconfigured(exc: BaseException, _interval: float) -> None:
        error = broker_error(settings, exc)
        if isinstance(error, BrokerMisconfigured):
            raise error from exc

    return {
        "max_retries": settings.publish_retries,
        "interval_start": 0,
        "interval_step": min(0.25, settings.publish_retry_max_s),
        "interval_max": settings.publish_retry_max_s,
        "errback": refuse_misconfigured,
    }


def redis_client(settings: Settings) -> redis.Redis | None:
    """A Redis client on the broker with :func:`redis_socket_options`; None for memory://.

    Raises ValueError for a Redis URL that does not parse (a port that is no port).
    """
    if not settings.broker_url.startswith(REDIS_SCHEMES):
        return None
    return redis.Redis.from_url(settings.broker_url, **redis_socket_options(settings))


def required_redis(settings: Settings, needs: str) -> redis.Redis:
    """The broker's Redis client (:func:`redis_client`) for a process that cannot run
    without one: :class:`ConfigError` for ``memory://`` (``needs`` says who needs Redis
    and why memory:// will not do) and for a Redis URL that does not parse."""
    url = f"{ENV_PREFIX}BROKER_URL={mask_url(settings.broker_url)!r}"
    try:
        client = redis_client(settings)
    except ValueError as exc:
        raise ConfigError(f"{url} cannot be parsed ({exc})") from exc
    if client is None:
        raise ConfigError(needs.format(url=url))
    return client


def lane_keys(queue: str) -> list[str]:
    """The Redis lists holding the waiting messages of the Celery queue ``queue``: kombu's
    Redis transport keeps one named after it, plus one per non-zero priority step
    (``<queue>\\x06\\x16<step>``)."""
    return [queue, *(f"{queue}{RedisChannel.sep}{step}" for step in PRIORITY_STEPS if step)]


def lane_queue(settings: Settings, bulk: bool) -> str:
    """The queue a submit goes to: bulk streams apart from interactive submits."""
    return queue_name(settings.family, LANE_BULK if bulk else LANE_INTERACTIVE)


#: The eviction policy the README asks of the broker Redis: a full Redis refuses writes.
NO_EVICTION = "noeviction"


@dataclass(frozen=True)
class EvictionPolicy:
    """The broker Redis's ``maxmemory`` (bytes, 0: no limit) and ``maxmemory-policy``, as
    ``INFO memory`` reports them: INFO answers where CONFIG is disabled (managed services).

    A queue is one Redis list: a policy that may evict any key (``allkeys-*``) may drop
    every task waiting in it at once, with no error to the producer or the worker. The
    ``volatile-*`` policies evict only keys with a TTL; the queues and kombu's unacked
    index have none, only bookkeeping keys do (heartbeats, delivery counts, the API's id
    claims and retry markers, a stream's run key), so they get a milder note.
    """

    policy: str
    maxmemory: int
    maxmemory_human: str

    @property
    def evicts_queue(self) -> bool:
        """Whether a full Redis may evict a queue: a limit, and a policy that is neither
        ``noeviction`` nor ``volatile-*`` (one this code does not know counts as risky)."""
        return (self.maxmemory > 0 and self.policy != NO_EVICTION
                and not self.policy.startswith("volatile-"))

    @property
    def evicts_ttl_keys(self) -> bool:
        """Whether a full Redis evicts keys with a TTL only (``volatile-*``, with a limit)."""
        return self.maxmemory > 0 and self.policy.startswith("volatile-")

    def warning(self) -> str | None:
        """What a policy that may evict the queues risks, and the fix; None otherwise."""
        if not self.evicts_queue:
            return None
        return (f"maxmemory-policy is {self.policy} with maxmemory {self.maxmemory_human}: "
                f"once its memory is full Redis evicts keys, a queue among them, and the "
                f"tasks queued there are lost without an error to anyone; give the broker "
                f"Redis the noeviction policy (`CONFIG SET maxmemory-policy {NO_EVICTION}` "
                f"and in redis.conf, or the maxmemory-policy parameter of a managed "
                f"service), which refuses new tasks when full instead")

    def note(self) -> str | None:
        """What a ``volatile-*`` policy risks (queued tasks are safe); None otherwise."""
        if not self.evicts_ttl_keys:
            return None
        return (f"maxmemory-policy is {self.policy} with maxmemory {self.maxmemory_human}: "
                f"queued tasks are safe (their keys have no TTL), but once its memory is "
                f"full Redis evicts keys that have one: a worker's heartbeat (it looks dead "
                f"until its next beat), the delivery counts behind "
                f"{ENV_PREFIX}MAX_ATTEMPTS, the API's id claims and retry markers; "
                f"{NO_EVICTION} keeps them (`CONFIG SET maxmemory-policy {NO_EVICTION}` or "
                f"the managed service's parameter)")


def eviction_policy(client: redis.Redis) -> EvictionPolicy | None:
    """The broker Redis's eviction settings from ``INFO memory``; None when INFO leaves
    them out (a proxy, an old server). Raises :class:`redis.RedisError` when INFO is
    refused (an ACL user without ``+info``) or not answered."""
    info = client.info("memory")
    policy, limit = info.get("maxmemory_policy"), info.get("maxmemory")
    if policy is None or limit is None:
        return None
    try:
        maxmemory = int(limit)
    except (TypeError, ValueError):
        return None
    human = info.get("maxmemory_human") or f"{maxmemory} bytes"
    return EvictionPolicy(str(policy), maxmemory, str(human))
