"""The light Python client: submit texts, watch the queue, fetch and wait for results.

Hop 1 of the data path (docs/architecture.md): validate, assign ids, publish JSON
messages to Redis through Celery. Reading results goes straight to the
results table (``contract.results``), not through Celery.

Imports neither torch nor transformers: a web app installs this alone.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import signal
import sqlite3
import threading
import time
import weakref
from collections.abc import (
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    MappingView,
    Sequence,
)
from collections.abc import Set as AbstractSet
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, TypeVar

import redis
import sqlalchemy as sa
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.pools import ProducerPool
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from contract import migrate
from contract.broker import broker_error, lane_keys, lane_queue, make_celery, redis_client
from contract.clock import ServerClock, server_time
from contract.constants import (
    DEFAULT_MODEL,
    LANE_BULK,
    LANE_INTERACTIVE,
    LANGS,
    MODEL_NAME_PATTERN,
    STATUSES,
    TASK_ANALYZE,
    served_name,
)
from contract.errors import (
    BertstreamError,
    BrokerUnavailable,
    ConfigError,
    IdConflict,
    InvalidInput,
    ResultTimeout,
    SchemaMismatch,
    StoreRefused,
    StoreUnavailable,
    causes,
    quoted,
)
from contract.liveness import HEARTBEAT_EVERY_S, live_workers
from contract.messages import MAX_TIMESTAMP, TaskItem, make_item, text_sha256
from contract.results import IdState, ResultRecord, ResultStore, WindowRecord
from contract.retries import is_retrying, retriable, retry_key, retry_marker
from contract.settings import REDIS_SCHEMES, Settings, mask_url, redis_url_problem
from producer.items import ItemError, ItemValidator
from producer.linger import LINGER_S, Flusher, WatchedSource

#: Longest pause between two polls of :meth:`Client.wait`, in seconds.
MAX_POLL_INTERVAL_S = 1.0

#: Seconds a read of :meth:`Client.wait` may take also past the wait's deadline: the
#: most a wait on a database that stopped answering overruns its timeout by. As long as
#: libpq's shortest wait for a connection (whole seconds, at least 2): a shorter floor
#: cut a distant database's first look (connect, schema check, read) every time, and
#: the next look, on a new connection, again.
MIN_WAIT_READ_S = 2.0

#: Seconds the caller-id check is skipped after the database could not be read, so a
#: stream does not wait out a connect timeout for every chunk while it is away.
CONFLICT_CHECK_BACKOFF_S = 60.0

#: Caller-id checks (a query each) one client runs at once; more wait their turn. Sources
#: read in threads of their own (any number of open websockets) flushing together asked
#: the store's connection pool (SQLAlchemy's default: 5, and 10 more) for more than it
#: holds, and a check kept waiting past its timeout was skipped. With the async client's
#: threads (:data:`producer.aclient.MAX_THREADS`) this stays within that pool.
ID_CHECKS = 5

log = logging.getLogger(__name__)


T = TypeVar("T")


class ClientClosed(BertstreamError, RuntimeError):
    """A :class:`Client` was used after :meth:`Client.close`: it would otherwise open new
    connections that nothing closes any more."""


#: Every open client of this process, so that a forked child drops what it inherited.
_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """In a forked child (gunicorn ``--preload``, multiprocessing): drop the connections
    every client inherited, without closing them (they are the parent's too); each opens
    its own on first use. Only the forking thread runs here, so no lock is needed."""
    for client in list(_CLIENTS):
        client._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _one_or_many(ids: Any, what: str) -> list[str]:
    """``ids`` (an iterable of ids) as a list, each checked to be a string.

    One string (or bytes) is refused with :class:`TypeError`, as
    :meth:`Client.submit_many` refuses it: it is an iterable of characters, each of
    which would be looked up as an id. An id that is no string is
    :class:`InvalidInput` (it could never be stored: the lookup would find nothing,
    and a wait would last its whole timeout).
    """
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable):
        raise TypeError(f"{what} takes an iterable of ids, not {type(ids).__name__}: "
                        f"pass [id]")
    wanted = list(ids)
    for task_id in wanted:
        _check_id(task_id)
    return wanted


def _check_id(task_id: Any) -> str:
    """``task_id`` if it is a string, else :class:`InvalidInput` naming its type."""
    if not isinstance(task_id, str):
        raise InvalidInput(f"id must be a string, got {type(task_id).__name__}")
    return task_id


def _seconds(value: Any, what: str, *, zero: bool) -> float:
    """``value`` as a finite number of seconds, at least 0 (``zero``) or above it; else
    :class:`InvalidInput` (NaN would make a deadline no time ever reaches)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{what} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        bound = "0 or more" if zero else "above 0"
        raise InvalidInput(f"{what} must be a finite number of seconds, {bound}; got {value!r}")
    return seconds


def _model_arg(model: Any) -> str | None:
    """A ``model=`` argument: None or a model name (``default`` included), else
    :class:`InvalidInput` saying what a name is (not the settings' ConfigError: the
    caller passed it, no environment variable is wrong)."""
    if model is None:
        return None
    if not isinstance(model, str):
        raise InvalidInput(f"model must be a string, got {type(model).__name__}")
    if model and not re.fullmatch(MODEL_NAME_PATTERN, model):
        raise InvalidInput(f"model {quoted(model)}: a model name is letters, digits, '.', '_' "
                           f"and '-' (at most 100, starting with a letter or digit)")
    return model


#: The values the ``status`` and ``lang`` filters take (those the rows hold), as the CLI's
#: ``--status``/``--lang`` and the API's ``status``/``lang`` parameters take them.
FILTER_VALUES: dict[str, tuple[str, ...]] = {"status": STATUSES, "lang": LANGS}


def _chunk_size_arg(chunk_size: Any) -> int | None:
    """A ``chunk_size=`` argument: None (the setting) or a whole number above 0, else
    :class:`InvalidInput` (0 silently meant the setting, a string was a TypeError)."""
    if chunk_size is not None and (isinstance(chunk_size, bool)
                                   or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise InvalidInput(f"chunk_size must be a whole number above 0 (None: "
                           f"BERTSTREAM_BULK_CHUNK_SIZE); got {chunk_size!r}")
    return chunk_size


def _linger_arg(linger_s: Any) -> float | None:
    """A ``linger_s=`` argument: None (only full chunks) or a finite number of seconds,
    0 or more, else :class:`InvalidInput`."""
    return None if linger_s is None else _seconds(linger_s, "linger_s", zero=True)


#: Iterables held in memory: reading them cannot block, so submit_many reads them in the
#: calling thread, with no reader thread nor linger (a str, bytes or dict is refused before).
_IN_MEMORY = (Sequence, AbstractSet, MappingView)


def _ids_arg(ids: Any) -> list[str] | None:
    """An ``ids=`` filter as a list, each id a string (:func:`_one_or_many`); None: no
    id filter. An iterator is read once, here: passed on as it was, it reached the
    store exhausted and the read found nothing. An empty list matches no row."""
    return None if ids is None else _one_or_many(ids, "ids=")


def _filter_args(values: Mapping[str, Any]) -> None:
    """Refuse, as :class:`InvalidInput`, a read filter of the wrong type: a text filter
    that is no string, a time bound that is no datetime. The database would otherwise
    compare them as it can: no rows on SQLite, a type error on PostgreSQL (reported as
    an outage, which a caller would retry). A ``status`` or ``lang`` no row can hold
    (``finished``, ``xx``) is refused with the values it takes: it read no rows, which
    looks like an answer."""
    for name, value in values.items():
        if value is None:
            continue
        if name in ("since", "until"):
            if not isinstance(value, dt.datetime):
                raise InvalidInput(f"{name} must be a datetime, got {type(value).__name__}")
        elif name == "limit":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"limit must be a whole number, 0 or more (None: no "
                                   f"limit); got {value!r}")
        elif not isinstance(value, str):
            raise InvalidInput(f"{name} must be a string, got {type(value).__name__}")
        elif name in FILTER_VALUES and value not in FILTER_VALUES[name]:
            raise InvalidInput(f"unknown {name} {quoted(value)}; expected one of "
                               f"{', '.join(FILTER_VALUES[name])} (None: any)")


def _close_returned_after_close(engine: sa.Engine, client: weakref.ref[Client]) -> None:
    """Close each connection given back to ``engine``'s pool once its client is closed.

    close() disposes of the pool, but a read in flight in another thread holds its
    connection and gives it back afterwards, into the pool close() dropped: it stayed
    open until the garbage collector found it (psycopg warns of such a connection)."""
    def checkin(dbapi_connection: Any, record: Any) -> None:
        owner = client()
        if dbapi_connection is not None and (owner is None or owner._closed):
            record.invalidate()

    sa.event.listen(engine, "checkin", checkin)


#: SQLSTATEs of a table (42P01, UndefinedTable) or a column (42703, UndefinedColumn)
#: PostgreSQL does not know.
MISSING_SCHEMA_SQLSTATES = frozenset({"42P01", "42703"})


def missing_sqlite_file(database_url: str) -> bool:
    """True when ``database_url`` names an SQLite file that does not exist: it has no rows,
    and a reader must not create it (a producer-only host with the default URL would get
    an empty ``bertstream.db`` wherever it runs). Not when its directory cannot be
    reached (missing, a file in its place, or one this user may not search): a mistyped
    path is a setting to fix, which the store refuses (exit 2, naming the path) as it
    does for ``db upgrade``, not an empty store. PostgreSQL, ``:memory:`` and SQLite URI
    paths are opened as before; a URL that is no URL is left to the store to refuse."""
    try:
        url = make_url(database_url)
    except (ArgumentError, ValueError):
        return False
    path = url.database
    if url.get_backend_name() != "sqlite" or not path or path == ":memory:":
        return False
    if path.startswith("file:") or os.path.exists(path):
        return False
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.isdir(folder) and os.access(folder, os.X_OK)  # else: the store says why


def missing_schema(exc: BaseException) -> bool:
    """True when ``exc``, or an error it was raised from, says a table or column does not
    exist (PostgreSQL UndefinedTable/UndefinedColumn, SQLite "no such table/column"): the
    schema changed under a reader that had checked it (``bertstream db downgrade``)."""
    for cause in causes(exc):
        if getattr(cause, "sqlstate", None) in MISSING_SCHEMA_SQLSTATES:
            return True
        if isinstance(cause, sqlite3.OperationalError) and str(cause).startswith(
                ("no such table", "no such column")):
            return True
    return False


#: Signals :func:`signals_held` holds: Ctrl-C, and SIGTERM (which a stream turns into one).
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs: one that arrives is delivered (its
    handler runs: KeyboardInterrupt) as the block ends, so a chunk published is also
    counted, and a resume does not send it twice. A second one is delivered at once (a
    publish retrying an absent Redis can still be stopped).

    On the main thread only (Python runs signal handlers there, and only there can set
    them); ignored signals and handlers set outside Python are left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    caught: list[tuple[int, FrameType | None]] = []

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append((signum, frame))
        if len(caught) > 1:
            restore()
            _deliver(signum, previous[signum], frame)

    for held in HELD_SIGNALS:
        handler = signal.getsignal(held)
        if handler is not None and handler != signal.SIG_IGN:
            previous[held] = signal.signal(held, hold)
    try:
        yield
    finally:
        restore()
        if len(caught) == 1:
            signum, frame = caught[0]
            _deliver(signum, previous[signum], frame)


def _deliver(signum: int, handler: Any, frame: FrameType | None) -> None:
    """Do what ``handler`` (the one a signal had before it was held) does with it."""
    if callable(handler):
        handler(signum, frame)
    else:  # SIG_DFL, restored: the default action (SIGTERM ends the process)
        signal.raise_signal(signum)


def _sent_before_failing(items: Iterable[Any], publisher: ChunkPublisher,
                         lock: threading.Lock | None = None) -> Iterator[Any]:
    """``items``; when iterating them raises (a generator whose cursor or consumer
    failed), the items buffered from before are published, then the error propagates:
    dropped, the caller (given no report) could not tell which items were sent. An
    interrupt propagates at once (nothing more is published). ``lock``: held for that
    flush (a :class:`Flusher`'s)."""
    source = iter(items)
    while True:
        try:
            obj = next(source)
        except StopIteration:
            return
        except Exception:
            with lock if lock is not None else nullcontext():
                publisher.flush()
            raise
        yield obj


def _take_lingering(items: Iterable[Any], publisher: ChunkPublisher, flusher: Flusher,
                    take: Callable[[int, Any], None]) -> None:
    """``take`` every item of ``items`` (read in this thread, one when asked for, as
    without linger) while ``flusher``'s thread publishes a partial chunk once due; the
    thread is stopped before the publisher's block ends, and its error raised here.

    Once that thread's send failed no next item is read (it stays in the source, a
    queue's post for another reader). One whose read was under way then is taken all the
    same, unsent, with the buffered ones, and so are those a :class:`WatchedSource` read
    with it (``ready``: an async iterable's run): they left the source (a queue's post),
    and dropped they would be in no count of what was not sent (``sent`` counts what
    was; a stopped async call logs the buffered items)."""
    lock, linger = flusher.lock, flusher.linger
    ready = items.ready if isinstance(items, WatchedSource) else lambda: False
    source = iter(enumerate(_sent_before_failing(items, publisher, lock)))
    try:
        while flusher.error is None or ready():
            try:
                index, obj = next(source)
            except StopIteration:
                break
            with lock:
                if flusher.error is not None:
                    publisher.holding = True
                messages = publisher.messages
                take(index, obj)
                if not publisher.holding and (linger.since is None
                                              or publisher.messages != messages):
                    flusher.added()
    finally:
        flusher.stop()
    if flusher.error is not None:
        raise flusher.error


@dataclass
class SubmitReport:
    """What :meth:`Client.submit_many` did: accepted ids in input order, refusals, messages."""

    ids: list[str] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)
    #: Broker messages published (one per chunk).
    messages: int = 0

    @property
    def accepted(self) -> int:
        """Number of items enqueued."""
        return len(self.ids)

    @property
    def rejected(self) -> int:
        """Number of items refused by validation."""
        return len(self.errors)


@dataclass
class IdCheck:
    """Caller ids checked against the stored rows: the conflicts (id -> why) and the
    retries of failed or expired rows (id -> retry marker)."""

    conflicts: dict[str, str] = field(default_factory=dict)
    retries: dict[str, str] = field(default_factory=dict)


@dataclass
class Buffered:
    """One item waiting in a :class:`ChunkPublisher`: where it came from, and whether its
    id is the caller's (then it is checked against the stored rows before it is sent)."""

    item: TaskItem
    line: int | None = None
    origin: Any = None
    caller_id: bool = False


class ChunkPublisher:
    """Buffers validated items and publishes them as one message per chunk.

    Takes the client, the lane and the chunk size; ``before_send`` (if given)
    runs before each message is published (streams hook backpressure there);
    ``after_send`` (if given) runs after it with the items sent and the
    ``origin`` each was added with (a Redis Stream source acks its entries there).
    Items added with ``caller_id`` are checked first (:meth:`Client.id_check`,
    one query per chunk): one whose id is stored with a different text is not
    sent but handed to ``on_conflict(buffered, reason)``; one that retries a
    failed or expired row gets its retry marker once its chunk is published.
    Guarantees: every item added is published by :meth:`flush`, refused as a
    conflict, or :class:`BrokerUnavailable` is raised; one producer (one
    connection) is reused. ``producer`` None: each message takes one from the
    client's pool and gives it back, so a publisher idle between chunks holds none.
    """

    def __init__(
        self,
        client: Client,
        producer: Any,
        *,
        bulk: bool,
        chunk_size: int,
        before_send: Callable[[], None] | None = None,
        after_send: Callable[[list[TaskItem], list[Any]], None] | None = None,
        on_conflict: Callable[[Buffered, str], None] | None = None,
    ) -> None:
        if chunk_size <= 0:
            raise InvalidInput(f"chunk_size must be > 0, got {chunk_size}")
        self._client = client
        self._producer = producer
        self._bulk = bulk
        self._chunk_size = chunk_size
        self._before_send = before_send
        self._after_send = after_send
        self._on_conflict = on_conflict
        self._buffer: list[Buffered] = []
        #: the retry markers of the buffered items that retry a failed or expired row
        self._retries: dict[str, str] = {}
        self.messages = 0
        self.published = 0
        #: True: :meth:`add` only buffers (a full chunk is not published): a send failed,
        #: and what is still taken is kept to be counted unsent, not sent or dropped
        self.holding = False

    @property
    def first_unsent_line(self) -> int | None:
        """The source line of the first buffered (not yet published) item, when known."""
        return self._buffer[0].line if self._buffer else None

    @property
    def pending(self) -> int:
        """How many items are buffered (not yet published)."""
        return len(self._buffer)

    def add(self, item: TaskItem, line: int | None = None, origin: Any = None, *,
            caller_id: bool = False) -> None:
        """Buffer ``item`` (from source ``line``, and ``origin`` for ``after_send``);
        publishes the chunk once it is full."""
        self._buffer.append(Buffered(item, line, origin, caller_id))
        if len(self._buffer) >= self._chunk_size and not self.holding:
            self.flush()

    def flush(self) -> None:
        """Publish what is buffered (nothing when empty), less the conflicting ids."""
        self._drop_conflicts()
        if not self._buffer:
            return
        if self._before_send is not None:
            self._before_send()
        items = [b.item for b in self._buffer]
        origins = [b.origin for b in self._buffer]
        # A Ctrl-C between the LPUSH and the count would report the chunk unsent (and a
        # resume would send it twice): it waits for the count and the trackers (the ids
        # file, the stream acks), then stops the run. The wait for a pooled producer comes
        # first: a Ctrl-C there stops the run at once, with nothing sent.
        with self._client._acquire_producer(self._producer) as producer, signals_held():
            self._client.publish(items, bulk=self._bulk, producer=producer)
            self.messages += 1
            self.published += len(items)
            self._buffer = []
            if self._retries:
                self._client.mark_retries(self._retries)
                self._retries = {}
            if self._after_send is not None:
                self._after_send(items, origins)

    def _drop_conflicts(self) -> None:
        if self._on_conflict is None or not any(b.caller_id for b in self._buffer):
            return
        check = self._client.id_check([b.item for b in self._buffer if b.caller_id])
        self._retries = check.retries
        conflicts = check.conflicts
        if not conflicts:
            return
        keep = []
        for b in self._buffer:
            if b.caller_id and b.item.id in conflicts:
                self._on_conflict(b, conflicts[b.item.id])
            else:
                keep.append(b)
        self._buffer = keep


class Client:
    """Submit texts to bertstream and read their results.

    Takes a :class:`Settings`; builds its Celery app at once (no connection
    until the first publish) and its database engine and Redis client on
    first use. Use as a context manager, or call :meth:`close`.

    Models: tasks go to the default model unless ``settings.model_name`` (or
    a ``model=`` argument) names another; reads give each task's latest
    result unless a model is named (a client bound to a named model reads
    that model's rows; ``default`` reads the default model's, :meth:`stored_model`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: Celery = make_celery(settings, name="bertstream-producer")
        self._lock = threading.Lock()
        self._producers: ProducerPool | None = None
        self._connections: Any = None
        self._store: ResultStore | None = None
        self._redis: redis.Redis | None = None
        self._table_seen = False
        self._for_models: dict[str, Client] = {}
        #: the default model's stored name and the monotonic time it was read at
        self._default_name: tuple[str, float] | None = None
        #: monotonic time until which :meth:`conflicts` skips the database (None: it is
        #: read); set on a failure, which is logged once per outage.
        self._conflicts_off_until: float | None = None
        #: held by each caller-id check while it reads
        self._id_checks = threading.BoundedSemaphore(ID_CHECKS)
        #: the Redis server's clock, which :meth:`publish` stamps messages on
        self._clock = self._server_clock()
        self._closed = False
        _CLIENTS.add(self)

    # -- lifecycle ------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release broker connections, the Redis client and the DB engine. Idempotent;
        the client cannot be used afterwards (:class:`ClientClosed`)."""
        with self._lock:
            self._closed = True
            others = list(self._for_models.values())
            self._for_models.clear()
            producers, connections, self._producers, self._connections = (
                self._producers, self._connections, None, None)
            client, self._redis = self._redis, None
            store, self._store = self._store, None
        _CLIENTS.discard(self)
        for other in others:
            other.close()
        if producers is not None:
            producers.force_close_all()
            connections.force_close_all()
        self.app.close()
        if client is not None:
            client.close()
        if store is not None:
            store.close()

    def _check_open(self) -> None:
        """Raise :class:`ClientClosed` after :meth:`close` (under the lock)."""
        if self._closed:
            raise self._closed_error()

    @staticmethod
    def _closed_error() -> ClientClosed:
        return ClientClosed("this bertstream Client is closed; create a new one "
                            "(or use it inside its `with` block)")

    @contextmanager
    def _unless_closed(self) -> Iterator[None]:
        """Run a call's own work on the broker or the database: an error it raises once
        :meth:`close` ran (in another thread, or in a hook of this call) is
        :class:`ClientClosed`. close() drops the connections under the call, which then
        failed as an outage (BrokerUnavailable, StoreUnavailable) or inside kombu
        (AttributeError, "Acquire on closed pool"): a caller would retry those."""
        try:
            yield
        except ClientClosed:
            raise
        except Exception as exc:
            if self._closed:
                raise self._closed_error() from exc
            raise

    def _on_redis(self, work: Callable[[redis.Redis], T]) -> T:
        """``work`` on this client's Redis client: Redis errors as :class:`BrokerUnavailable`
        (or :class:`ClientClosed` when :meth:`close` ran meanwhile). A connection the call
        opened again after close() is closed with it, not left to the garbage collector."""
        client = self._redis_client()
        try:
            with self._unless_closed():
                try:
                    return work(client)
                except redis.RedisError as exc:
                    raise self._broker_error(exc) from exc
        finally:
            if self._closed:
                client.close()

    def _forked(self) -> None:
        """Forget what this process inherited from its parent (see
        :func:`_after_fork_in_child`): sockets and database connections shared by two
        processes mix their replies (one reads the other's results). The engine drops
        its pool without closing the parent's connections; the rest is rebuilt on use."""
        self._lock = threading.Lock()
        self._id_checks = threading.BoundedSemaphore(ID_CHECKS)
        self._producers = self._connections = None
        self._redis = None
        self._clock = self._server_clock()  # its lock may be held by a thread not forked
        if self._store is not None:
            self._store.engine.dispose(close=False)

    def for_model(self, model: str | None) -> Client:
        """A client for the model named ``model`` (this one when it already is; None or
        ``default``: the default model), closed with this one. Raises :class:`InvalidInput`
        for a name no model can have."""
        name = served_name(_model_arg(model))
        if name == self.settings.model_name:
            return self
        with self._lock:
            self._check_open()
            if name not in self._for_models:
                self._for_models[name] = Client(self.settings.replace(model_name=name))
            return self._for_models[name]

    def _model(self, model: str | None) -> str | None:
        """The model a read is for: the one named, else this client's, else None (latest);
        as stored (:meth:`stored_model`)."""
        return self.stored_model(model or self.settings.model_name or None)

    def stored_model(self, model: str | None) -> str | None:
        """The name the rows of ``model`` are stored under: ``model`` itself, but for
        ``default`` the default model's own name, as a submit to ``default`` goes to it.

        Only the default model's workers know that name (their BERTSTREAM_MODEL or
        ``worker --model default=PATH``, not the reader's): it is read from the
        heartbeats of the live workers of the default queue family, again at most every
        :data:`HEARTBEAT_EVERY_S`. Raises :class:`InvalidInput` when none is alive or
        they announce several names: a guess would read another model's rows, or none.
        """
        if model is not None and not isinstance(model, str):
            raise InvalidInput(f"model must be a string, got {type(model).__name__}")
        if model != DEFAULT_MODEL:
            return model
        known = self._default_name
        if known is not None and time.monotonic() - known[1] < HEARTBEAT_EVERY_S:
            return known[0]
        names = self.default_model_names()
        hint = ("name the model as its rows show it (`bertstream results --aggregate model` "
                "or /v1/stats?by=model lists them)")
        if names is not None and len(names) > 1:
            raise InvalidInput(f"model 'default' is ambiguous: the default model's live "
                               f"workers store their rows as {' and '.join(names)}; {hint}")
        if not names:
            why = (f"no worker of the default model is alive on queue "
                   f"{self.settings.queue!r} to tell that name" if names is not None else
                   f"only its workers' heartbeats on a Redis broker tell that name, not "
                   f"{mask_url(self.settings.broker_url)}")
            raise InvalidInput(f"model 'default' is the default model, whose rows carry its "
                               f"own name, and {why}; {hint}")
        self._default_name = (names[0], time.monotonic())
        return names[0]

    def default_model_names(self) -> list[str] | None:
        """The names the live workers of the default queue family store their rows under
        (the default model's own name; two while a new one rolls out), read from their
        heartbeats: empty when none is alive, None when that cannot be known (a broker
        other than Redis). Raises :class:`BrokerUnavailable` when Redis cannot be reached."""
        if not self.settings.broker_url.startswith(REDIS_SCHEMES):
            return None
        alive = self._on_redis(lambda r: live_workers(r, self.settings.queue))
        return sorted({str(w["model"]) for w in alive if w.get("model")})

    # -- submitting -----------------------------------------------------

    def submit(
        self,
        text: str | bytes,
        *,
        id: str | None = None,
        source: str | None = None,
        meta: dict[str, Any] | None = None,
        ttl_s: float | None = None,
        model: str | None = None,
    ) -> str:
        """Validate one text and publish it on the interactive lane; return its id at once.

        ``ttl_s``: seconds the task stays worth running (see :meth:`submit_many`).
        ``model``: the named model to run it (default: this client's).
        Raises :class:`InvalidInput` (with the reason) for bad input,
        :class:`IdConflict` when ``id`` is stored with a different text, and
        :class:`BrokerUnavailable` when Redis cannot be reached.
        """
        if _model_arg(model) is not None and model != self.settings.model_name:
            return self.for_model(model).submit(text, id=id, source=source, meta=meta,
                                                ttl_s=ttl_s)
        item = make_item(text, self.settings, id=id, source=source, meta=meta, ttl_s=ttl_s)
        retrying = self.check_conflicts([item]) if id is not None else {}
        self.publish([item], bulk=False)
        self.mark_retries(retrying)
        return item.id

    def submit_many(
        self,
        items: Iterable[str | bytes | dict[str, Any]],
        *,
        source: str | None = None,
        chunk_size: int | None = None,
        ttl_s: float | None = None,
        model: str | None = None,
        linger_s: float | None = LINGER_S,
    ) -> SubmitReport:
        """Validate many items and publish the good ones on the bulk lane in chunks.

        ``items`` are texts or dicts ``{text, id?, source?, meta?}``; ``source``
        applies to items without their own. Chunks hold ``chunk_size``
        (default ``settings.bulk_chunk_size``) items per message, each published
        over a producer of the client's pool held only while it is sent (a quiet
        source holds none between its chunks). Bad items are reported by index and never
        stop the rest; ids supplied twice are refused the second time.
        ``ttl_s``: seconds the tasks stay worth running; a task still queued
        after that is stored as ``expired`` without reaching the model.
        ``linger_s``: a partial chunk is published once its oldest item has waited
        this long, even while ``items`` blocks (a live or slow generator: a websocket,
        a tail, one post a second): a thread of its own publishes it then, while
        ``items`` is still read here, one item when asked for. None: only full chunks
        and the last one at the end. A list, tuple or set (held in memory, nothing to
        wait for) starts no thread.
        Raises :class:`BrokerUnavailable` when Redis stays unreachable through
        the publish retries; it says how many items were sent (those stay queued),
        :class:`TypeError` for one text or one dict item instead of many (a string
        is an iterable of characters, a dict of its keys: each would become a task)
        or for no iterable at all (None), and :class:`InvalidInput` for a ``source``,
        ``ttl_s``, ``chunk_size`` or ``linger_s`` no item can take (refused once, not
        per item). An error ``items`` raises (a generator whose source failed)
        propagates once every good item it gave before is published, so the caller
        resumes after the last item given.
        """
        if isinstance(items, (str, bytes, bytearray, Mapping)):
            one = "dict item" if isinstance(items, Mapping) else type(items).__name__
            raise TypeError(f"submit_many takes an iterable of items, not one {one}: use "
                            f"submit(text) or submit_many([item])")
        if not isinstance(items, Iterable):
            raise TypeError(f"submit_many takes an iterable of items (texts, or dicts with "
                            f"'text'), not {type(items).__name__}")
        _chunk_size_arg(chunk_size)
        linger_s = _linger_arg(linger_s)
        self._call_args(source, ttl_s)
        if _model_arg(model) is not None and model != self.settings.model_name:
            return self.for_model(model).submit_many(items, source=source, chunk_size=chunk_size,
                                                     ttl_s=ttl_s, linger_s=linger_s)
        size = chunk_size or self.settings.bulk_chunk_size
        validator = ItemValidator(self.settings, source, ttl_s=ttl_s)
        report = SubmitReport()
        conflicted: list[tuple[int, str, str]] = []

        def on_conflict(b: Buffered, reason: str) -> None:
            conflicted.append((b.line or 0, b.item.id, reason))

        # A producer per message, not one for the call: a quiet source (a websocket open
        # for hours) holds none of the client's pooled producers between its chunks.
        self._producer_pool()
        publisher = ChunkPublisher(self, None, bulk=True, chunk_size=size,
                                   on_conflict=on_conflict)
        add = publisher.add

        def take(index: int, obj: Any) -> None:
            checked = validator.check(index, obj)
            if isinstance(checked, ItemError):
                report.errors.append(checked)
                return
            add(checked, index, caller_id=isinstance(obj, Mapping) and obj.get("id") is not None)
            report.ids.append(checked.id)

        try:
            if isinstance(items, WatchedSource):
                flusher = Flusher(publisher, linger_s)
                items.watch(flusher)
                _take_lingering(items, publisher, flusher, take)
            elif linger_s is None or isinstance(items, _IN_MEMORY):
                for index, obj in enumerate(_sent_before_failing(items, publisher)):
                    take(index, obj)
            else:
                _take_lingering(items, publisher, Flusher(publisher, linger_s), take)
            publisher.flush()
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(exc.reason, sent=publisher.published) from exc
        report.messages = publisher.messages
        if conflicted:
            refused = {task_id for _, task_id, _ in conflicted}
            report.ids = [i for i in report.ids if i not in refused]
            report.errors.extend(ItemError(n, task_id, why) for n, task_id, why in conflicted)
            report.errors.sort(key=lambda e: e.index)
        return report

    def _call_args(self, source: Any, ttl_s: Any) -> None:
        """Refuse, as :class:`InvalidInput`, a ``source`` or ``ttl_s`` argument of a bulk
        call that no item could take: each item was refused for it, one by one, and
        nothing sent (:meth:`submit` raises for the same argument)."""
        try:
            make_item("-", self.settings, source=source, ttl_s=ttl_s)
        except InvalidInput as exc:
            raise InvalidInput(exc.reason) from None

    @contextmanager
    def chunk_publisher(
        self,
        *,
        bulk: bool = True,
        chunk_size: int | None = None,
        before_send: Callable[[], None] | None = None,
        after_send: Callable[[list[TaskItem], list[Any]], None] | None = None,
        on_conflict: Callable[[Buffered, str], None] | None = None,
    ) -> Iterator[ChunkPublisher]:
        """A :class:`ChunkPublisher` over one pooled producer; flushes the last chunk on exit.

        On an exception inside the block the buffered remainder is dropped
        (not published) and the exception propagates. ``chunk_size``: None (the
        setting) or a whole number above 0, else :class:`InvalidInput`.
        """
        size = _chunk_size_arg(chunk_size) or self.settings.bulk_chunk_size
        try:
            with self._acquire_producer(producer=None) as producer:
                publisher = ChunkPublisher(
                    self, producer, bulk=bulk, chunk_size=size, before_send=before_send,
                    after_send=after_send, on_conflict=on_conflict,
                )
                yield publisher
                publisher.flush()
        except KombuOperationalError as exc:
            raise self._broker_error(exc) from exc

    def publish(self, items: Sequence[TaskItem], *, bulk: bool, producer: Any = None) -> None:
        """Publish ``items`` (already validated) as ONE message on the chosen lane, their
        times and deadlines on the Redis server's clock (:meth:`_on_server_clock`).

        Raises :class:`BrokerUnavailable` when Redis cannot be reached.
        """
        wire = self._on_server_clock(items)
        try:
            with self._acquire_producer(producer) as p, self._unless_closed():
                self.app.send_task(
                    TASK_ANALYZE,
                    args=[wire],
                    queue=lane_queue(self.settings, bulk),
                    producer=p,
                    ignore_result=True,
                    # The default repr would copy up to 1 KiB of texts into the headers.
                    argsrepr=f"<{len(wire)} item(s)>",
                )
        except KombuOperationalError as exc:
            raise self._broker_error(exc) from exc

    def _on_server_clock(self, items: Sequence[TaskItem]) -> list[dict[str, Any]]:
        """The wire form of ``items``, each ``submitted_at`` and ``expires_at`` moved from
        this host's clock onto the Redis server's, which workers stamp rows and compare
        deadlines with: hosts whose clocks are apart neither expire a task on arrival nor
        run it late, and store times one clock measured.

        Every time published here was set on this host's clock (``submit``,
        ``submit_many``, streams, the CLI, the HTTP API), and both move by one offset, so a
        deadline stays ``submitted_at`` + ttl. The offset is refreshed every few seconds
        (:class:`ServerClock`): no ``TIME`` per message, none on ``memory://`` (one
        process, one clock). When Redis does not answer it, the last offset read (none
        yet: this host's clock) is used and the publish meets the outage as before.
        """
        wire = [item.to_wire() for item in items]
        if not wire:
            return wire
        offset = self._clock.current_offset()
        for w in wire:
            for key in ("submitted_at", "expires_at"):
                if key in w:
                    w[key] = min(max(w[key] + offset, 0.0), MAX_TIMESTAMP)
        return wire

    def server_now(self) -> float:
        """Now on the Redis server's clock, in UNIX seconds: the clock row times are
        stamped on, so a window ending now that bounds them (the last minute's results)
        holds the same rows whatever this host's clock says. One ``TIME`` every few
        seconds (:class:`ServerClock`); a broker other than Redis, or Redis not answering
        before any read: this host's clock. Raises :class:`ConfigError` when Redis refuses
        the broker URL (as :meth:`queue_length` does)."""
        return self._clock.now()

    def _server_clock(self) -> ServerClock:
        """The Redis server's clock, read through :meth:`_on_redis` (its errors are
        :class:`BrokerUnavailable`, or :class:`ClientClosed` once closed); this host's
        clock for a broker other than Redis."""
        if not self.settings.broker_url.startswith(REDIS_SCHEMES):
            return ServerClock(None)
        return ServerClock(read=lambda: self._on_redis(server_time))

    @contextmanager
    def _acquire_producer(self, producer: Any) -> Iterator[Any]:
        """``producer`` itself, or one from this client's own pool.

        The pools are private, not Celery's process-wide ones (kombu keys
        those by URL), so closing this client never breaks another one.
        Thread-safe: each thread gets its own producer and connection.
        After :meth:`close`, :class:`ClientClosed`, also for a ``producer``
        given (a :class:`ChunkPublisher`'s): it would reconnect for good. A
        connection a producer reopened while close() ran is closed as it is
        given back (the closed pool keeps it, open, for nothing).
        """
        if producer is not None:
            self._check_open()
            yield producer
            return
        pool = self._producer_pool()
        with self._unless_closed():
            acquired = pool.acquire(block=True)
        try:
            yield acquired
        finally:
            connection = getattr(acquired, "__connection__", None)
            acquired.release()
            if self._closed and connection is not None:
                with suppress(Exception):  # already closed by close(): nothing to do
                    connection.collect()

    def _producer_pool(self) -> ProducerPool:
        """This client's producer pool, built on first use (no connection yet); raises
        :class:`ClientClosed` after :meth:`close`, :class:`ConfigError` for a broker URL
        kombu cannot parse."""
        with self._lock:
            self._check_open()
            if self._producers is None:
                limit = self.app.conf.broker_pool_limit
                self._check_url()
                try:
                    connection = self.app.connection_for_write()
                except ValueError as exc:  # kombu parses the URL here: a port that is no number
                    raise self._url_error(exc) from exc
                self._connections = connection.Pool(limit=limit)
                self._producers = ProducerPool(self._connections, limit=limit)
            return self._producers

    def _check_url(self) -> None:
        """Settings built without :meth:`Settings.validate` may hold a Redis URL that does
        not parse: kombu refused its database index in the middle of a publish (a
        ValueError, a traceback) and redis-py read database 0 for it."""
        url = self.settings.broker_url
        problem = redis_url_problem(url) if url.startswith(REDIS_SCHEMES) else None
        if problem:
            raise self._url_error(ValueError(problem))

    def _url_error(self, exc: ValueError) -> ConfigError:
        return ConfigError(f"broker URL {mask_url(self.settings.broker_url)!r} cannot be "
                           f"parsed ({exc}): set BERTSTREAM_BROKER_URL or --broker-url")

    def _broker_error(self, exc: BaseException) -> BrokerUnavailable | ConfigError:
        """:class:`BrokerUnavailable`; :class:`ConfigError` when Redis answered but refused
        the URL's database index or credentials (:func:`contract.broker.broker_error`)."""
        return broker_error(self.settings, exc)

    # -- the queue ------------------------------------------------------

    def queue_names(self, lane: str | None = None) -> list[str]:
        """Redis keys holding the waiting messages of ``lane`` (both lanes when None;
        see :func:`lane_keys`)."""
        lanes = [LANE_INTERACTIVE, LANE_BULK] if lane is None else [lane]
        if any(x not in (LANE_INTERACTIVE, LANE_BULK) for x in lanes):
            raise InvalidInput(f"unknown lane {lane!r}; expected {LANE_INTERACTIVE} or {LANE_BULK}")
        return [key for name in lanes
                for key in lane_keys(lane_queue(self.settings, name == LANE_BULK))]

    def queue_length(self, lane: str | None = None) -> int:
        """Messages waiting in Redis on ``lane`` (``interactive``/``bulk``; both when None).

        Counts messages, not texts (a bulk message holds up to a chunk), and
        not the ones a worker has reserved. Only redis:// brokers keep
        countable queues: for others (``memory://``) this returns 0.
        Raises :class:`BrokerUnavailable` when Redis cannot be reached.
        """
        if not self.settings.broker_url.startswith(REDIS_SCHEMES):
            return 0
        names = self.queue_names(lane)

        def lengths(client: redis.Redis) -> list[Any]:
            with client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.llen(name)
                return list(pipe.execute())

        return sum(int(size) for size in self._on_redis(lengths))

    def _redis_client(self) -> redis.Redis:
        # Under the lock: two threads building a client each would leave one
        # unreferenced, and its finaliser closes the connection the other is using.
        with self._lock:
            self._check_open()
            if self._redis is None:
                self._check_url()
                try:
                    self._redis = redis_client(self.settings)
                except ValueError as exc:
                    raise self._url_error(exc) from exc
                if self._redis is None:  # pragma: no cover - queue_length checks the scheme
                    raise InvalidInput(f"{mask_url(self.settings.broker_url)} is not a Redis URL")
            return self._redis

    # -- results --------------------------------------------------------

    @property
    def store(self) -> ResultStore:
        """The results store, created on first use (once, whichever thread asks first)."""
        with self._lock:
            self._check_open()
            if self._store is None:
                self._store = ResultStore.from_settings(self.settings)
                _close_returned_after_close(self._store.engine, weakref.ref(self))
            return self._store

    def _table_exists(self) -> bool:
        # A client only reads: it must not create the table behind the
        # migrations' back, so before any worker ran there are simply no rows.
        # While a worker is still migrating an empty database the table is
        # there without its later columns: settled() waits that out. A schema
        # left behind the code is refused with the command to run; one newer
        # code migrated is read as before (the API refuses it at start).
        if not self._table_seen:
            if missing_sqlite_file(self.settings.database_url):
                return False  # opening it would create it, empty (./bertstream.db by default)
            try:
                schema = migrate.settled(self.store)
            except StoreUnavailable as exc:
                url = mask_url(self.settings.database_url)
                if isinstance(exc, StoreRefused):  # a setting: exit 2, not 3
                    raise StoreRefused(f"the results database at {url} refuses this "
                                       f"client: {exc}", exc.problem) from exc
                raise StoreUnavailable(f"cannot reach the results database at {url}: "
                                       f"{exc}") from exc
            problem = schema.problem()
            if problem and not schema.empty and not schema.newer():
                raise SchemaMismatch(problem)
            self._table_seen = schema.has_results
        return self._table_seen

    def recheck_schema(self, exc: BaseException) -> bool:
        """After a read failed with ``exc``: when it says a table or column is missing
        (:func:`missing_schema`), read the schema again instead of trusting the check the
        first read cached (a ``bertstream db downgrade`` under a running reader), raising
        :class:`SchemaMismatch` with the command to run when it is behind the code.
        Gives whether the results table is there now (False: nothing to read); True for
        another error. Checked on a failure only, so a read stays one query."""
        if not missing_schema(exc):
            return True
        self._table_seen = False
        return self._table_exists()

    def _read(self, work: Callable[[], T], empty: T) -> T:
        """``work()`` (a read of the results table); ``empty`` while there is no table.
        A read that finds a table or column missing checks the schema again
        (:meth:`recheck_schema`): a schema behind the code is a :class:`SchemaMismatch`.
        One that loses a race with :meth:`close` is :class:`ClientClosed`, and a
        connection it opened again on the closed engine is closed with it."""
        self._check_open()
        store = self._store
        try:
            with self._unless_closed():
                if not self._table_exists():
                    return empty
                store = self._store
                try:
                    return work()
                except (StoreUnavailable, SQLAlchemyError) as exc:
                    if not self.recheck_schema(exc):
                        return empty
                    raise
        finally:
            if self._closed and store is not None:
                store.close()

    def id_check(self, items: Sequence[TaskItem]) -> IdCheck:
        """Caller ids among ``items`` checked against the stored rows (one query).

        A caller id is an idempotency key: the same text again is harmless
        (the stored row stands, and a worker does not run it again), another
        text under it would silently get the old row: a conflict. The same text
        after a ``failed`` or ``expired`` row is a retry: the new attempt
        replaces the row, and its retry marker (:meth:`mark_retries`, once sent)
        makes :meth:`wait` wait for it. When the database cannot be read the
        check is skipped: submitting needs only Redis. After such a failure it
        is skipped without trying for :data:`CONFLICT_CHECK_BACKOFF_S`, and one
        warning is logged per outage. At most :data:`ID_CHECKS` run at once.
        """
        with self._id_checks:
            return self._id_check(items)

    def _id_check(self, items: Sequence[TaskItem]) -> IdCheck:
        off_until = self._conflicts_off_until
        if off_until is not None and time.monotonic() < off_until:
            return IdCheck()
        try:
            # Any model's row: an id names one text, whichever model scores it.
            stored: dict[str, IdState] = self._read(
                lambda: self.store.id_states([it.id for it in items]), {})
        except SchemaMismatch:
            return IdCheck()
        except StoreUnavailable as exc:
            if off_until is None:
                log.warning("caller ids are not checked against stored rows (the results "
                            "database cannot be read; tried again in %g s): %s",
                            CONFLICT_CHECK_BACKOFF_S, exc)
            self._conflicts_off_until = time.monotonic() + CONFLICT_CHECK_BACKOFF_S
            return IdCheck()
        self._conflicts_off_until = None
        check = IdCheck()
        for it in items:
            state = stored.get(it.id)
            if state is None:
                continue
            digest = text_sha256(it.text)
            if state.hashes != {digest}:
                check.conflicts[it.id] = (f"id {it.id!r} is already stored with a different "
                                          "text (the stored result stands; use a new id)")
            elif retriable(state.status):
                check.retries[it.id] = retry_marker(state.attempts, state.model,
                                                    self.settings.model_name)
        return check

    def check_conflicts(self, items: Sequence[TaskItem]) -> dict[str, str]:
        """Raise :class:`IdConflict` for the first id of ``items`` stored with another text;
        else give the retry markers of those that retry a failed or expired row (for
        :meth:`mark_retries` once they are sent)."""
        check = self.id_check(items)
        if check.conflicts:
            task_id, reason = next(iter(check.conflicts.items()))
            raise IdConflict(reason, item_id=task_id)
        return check.retries

    def mark_retries(self, markers: dict[str, str]) -> None:
        """Record that these tasks (id -> retry marker) were queued again, so that
        :meth:`wait` waits for their new attempt instead of returning the old row. Best
        effort: the tasks are queued already, so a Redis error is logged, not raised."""
        if not markers or not self.settings.broker_url.startswith(REDIS_SCHEMES):
            return

        def mark(client: redis.Redis) -> None:
            with client.pipeline(transaction=False) as pipe:
                for task_id, marker in markers.items():
                    pipe.set(retry_key(self.settings.queue, task_id), marker,
                             ex=self.settings.api_id_ttl_s)
                pipe.execute()

        try:
            self._on_redis(mark)
        except (BrokerUnavailable, ConfigError, ClientClosed) as exc:
            log.warning("%d retried task(s) queued without their retry marker (a wait may "
                        "return the old row): %s", len(markers), exc)

    def has_results_table(self) -> bool:
        """True once a worker created the results table (before that there are no rows)."""
        return self._read(lambda: True, False)

    def get(self, id: str, model: str | None = None, *,
            latest: bool = False) -> ResultRecord | None:
        """The result of task ``id`` (``model``'s, else this client's model's, else its
        latest), or None while not stored. ``latest``: see :meth:`get_many`."""
        return self.get_many([_check_id(id)], model=model, latest=latest).get(id)

    def windows(self, id: str, model: str | None = None) -> list[WindowRecord]:
        """The windows a long text was scored in, in order: each one's character span
        (``start_char``, ``end_char``), tokens, label, score and scores.

        Of the row under ``model``, or of the task's latest row when no model
        is given. Empty for a text scored in one pass, or not stored yet.
        """
        return self.windowed(id, model)[1]

    def windowed(self, id: str,
                 model: str | None = None) -> tuple[ResultRecord | None, list[WindowRecord]]:
        """The row of task ``id`` (under ``model``, default its latest) and its windows."""
        nothing: tuple[ResultRecord | None, list[WindowRecord]] = (None, [])
        _check_id(id)
        _filter_args({"model": model})
        return self._read(lambda: self.store.get_windows(id, self.stored_model(model)), nothing)

    def get_many(self, ids: Iterable[str], model: str | None = None, *,
                 latest: bool = False) -> dict[str, ResultRecord]:
        """Stored results among ``ids``, keyed by id (batched IN queries); an id with no
        stored row is absent. Raises :class:`InvalidInput` for an id that is no string
        and :class:`TypeError` for one id instead of many.

        Without ``model``, a client of a named model reads that model's rows; with
        ``latest``, each task's latest row whatever model this client submits to (a
        reader for every model, as the HTTP API's status reads)."""
        wanted = _one_or_many(ids, "get_many")
        _filter_args({"model": model})
        if not wanted:
            return {}
        target = self.stored_model(model) if latest else self._model(model)
        return self._read(lambda: self.store.get_many(wanted, model=target), {})

    def wait(
        self,
        ids: Iterable[str],
        *,
        timeout: float = 30.0,
        poll_interval: float = 0.05,
        model: str | None = None,
    ) -> dict[str, ResultRecord]:
        """Block until every id has a result; return them all, keyed by id.

        A failed or expired row whose retry is queued (the same id and text sent
        again, see :meth:`id_check`) is not a result yet: the wait goes on for
        the new attempt.

        Polls the table for the still-missing ids only, starting every
        ``poll_interval`` seconds and backing off (x1.5) to at most
        :data:`MAX_POLL_INTERVAL_S`. Raises :class:`ResultTimeout` carrying
        the missing ids when ``timeout`` seconds pass first. ``timeout`` (0: one look)
        and ``poll_interval`` are finite seconds, else :class:`InvalidInput`; no ids
        give ``{}`` at once.

        A database that cannot be reached is polled on until the timeout (a restart
        or a failover is ridden out); still unreachable then, or silent (a read
        still unanswered at the timeout is cut, see :data:`MIN_WAIT_READ_S`), it
        is :class:`StoreUnavailable`: the cause, where :class:`ResultTimeout`
        says the database answered without the results. A refusal
        (:class:`StoreRefused`, a setting to fix) is raised at once.
        """
        polls = self.wait_polls(ids, timeout=timeout, poll_interval=poll_interval,
                                model=model)
        while True:
            try:
                pause = next(polls)
            except StopIteration as done:
                return done.value
            time.sleep(pause)

    def wait_polls(
        self,
        ids: Iterable[str],
        *,
        timeout: float = 30.0,
        poll_interval: float = 0.05,
        model: str | None = None,
    ) -> Generator[float, None, dict[str, ResultRecord]]:
        """:meth:`wait` in steps, for a caller that pauses in its own way (the async
        client pauses on its event loop, not in a thread): the same arguments, checked
        at once. Each ``next()`` reads the table once, ended by the wait's deadline (the
        first also resolves ``model``, :meth:`stored_model`) and yields the seconds to
        pause before the next; the generator returns what :meth:`wait` returns, or
        raises what it raises (:class:`ResultTimeout`, :class:`StoreUnavailable`,
        :class:`ClientClosed`...)."""
        wanted = list(dict.fromkeys(_one_or_many(ids, "wait")))
        timeout = _seconds(timeout, "timeout", zero=True)
        poll_interval = _seconds(poll_interval, "poll_interval", zero=False)
        return self._polls(wanted, timeout, poll_interval, model)

    def _polls(self, wanted: list[str], timeout: float, poll_interval: float,
               model: str | None) -> Generator[float, None, dict[str, ResultRecord]]:
        """The steps of :meth:`wait_polls`, its arguments checked."""
        if not wanted:
            return {}
        model = self.stored_model(model)  # once, not at every poll
        found: dict[str, ResultRecord] = {}
        #: rows being retried (id -> their attempts and model): a new attempt ends the wait
        stale: dict[str, tuple[int, str]] = {}
        deadline = time.monotonic() + timeout
        interval = max(poll_interval, 0.001)
        #: the error of the last poll, when the database could not be read
        outage: StoreUnavailable | None = None
        while True:
            missing = [i for i in wanted if i not in found]
            if missing:
                try:
                    rows = self._poll_read(missing, model, deadline)
                    outage = None
                except StoreRefused:
                    raise  # a setting to fix: no wait mends it
                except StoreUnavailable as exc:
                    # Polled on till the timeout: a restart or a failover is ridden out.
                    if outage is None and time.monotonic() < deadline:
                        log.info("the results database cannot be read; the wait polls on "
                                 "until its timeout: %s", exc)
                    outage, rows = exc, {}
                found.update(self._not_retrying(rows, stale, model))
                missing = [i for i in wanted if i not in found]
            if not missing:
                return {i: found[i] for i in wanted}
            left = deadline - time.monotonic()
            if left <= 0:
                if outage is not None:
                    raise outage  # the cause: not "the results are not there"
                raise ResultTimeout(missing)
            yield min(interval, left)
            interval = min(interval * 1.5, max(MAX_POLL_INTERVAL_S, poll_interval))

    def _poll_read(self, missing: list[str], model: str | None,
                   deadline: float) -> dict[str, ResultRecord]:
        """One poll of :meth:`_polls`: :meth:`get_many`, ended by the wait's ``deadline``
        (:meth:`ResultStore.until`; given at least :data:`MIN_WAIT_READ_S`, so that the
        last poll, or the one look of a zero timeout, can finish on a database that
        answers)."""
        with ResultStore.until(max(deadline, time.monotonic() + MIN_WAIT_READ_S)):
            return self.get_many(missing, model=model)

    def _not_retrying(self, rows: dict[str, ResultRecord], stale: dict[str, tuple[int, str]],
                      model: str | None) -> dict[str, ResultRecord]:
        """``rows`` less those a queued retry replaces (remembered in ``stale``)."""
        out = {}
        ask = []
        for task_id, row in rows.items():
            if stale.get(task_id) == (row.attempts, row.model):
                continue
            if retriable(row.status) and self.settings.broker_url.startswith(REDIS_SCHEMES):
                ask.append(row)
            else:
                out[task_id] = row
        if ask:
            keys = [retry_key(self.settings.queue, r.id) for r in ask]
            try:
                markers = self._on_redis(lambda r: r.mget(keys))
            except (BrokerUnavailable, ConfigError) as exc:
                log.warning("waiting without the retry markers: %s", exc)
                markers = [None] * len(ask)
            for row, raw in zip(ask, markers, strict=True):
                marker = raw.decode("utf-8") if isinstance(raw, bytes) else None
                if is_retrying(marker, row.attempts, row.model, self._model(model)):
                    stale[row.id] = (row.attempts, row.model)
                else:
                    out[row.id] = row
        return out

    def query(
        self,
        *,
        ids: Iterable[str] | None = None,
        source: str | None = None,
        label: str | None = None,
        status: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = 100,
        newest_first: bool = True,
        model: str | None = None,
        lang: str | None = None,
    ) -> list[ResultRecord]:
        """Results matching every given filter (see :meth:`ResultStore.query`); a filter
        of the wrong type, or a ``status`` or ``lang`` no row holds, is
        :class:`InvalidInput`. ``ids``: any number of ids (none: no row)."""
        wanted = _ids_arg(ids)
        _filter_args({"source": source, "label": label, "status": status,
                      "since": since, "until": until, "limit": limit, "model": model,
                      "lang": lang})
        return self._read(lambda: self.store.query(
            ids=wanted, source=source, label=label, status=status,
            since=since, until=until, limit=limit, newest_first=newest_first,
            model=self._model(model), lang=lang,
        ), [])

    def count(
        self,
        *,
        ids: Iterable[str] | None = None,
        source: str | None = None,
        label: str | None = None,
        status: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        model: str | None = None,
        lang: str | None = None,
    ) -> int:
        """Tasks matching every given filter (0 before any worker created the table);
        arguments as :meth:`query`."""
        wanted = _ids_arg(ids)
        _filter_args({"source": source, "label": label, "status": status,
                      "since": since, "until": until, "model": model, "lang": lang})
        return self._read(lambda: self.store.count(
            ids=wanted, source=source, label=label, status=status, since=since, until=until,
            model=self._model(model), lang=lang), 0)

    def live_workers(self) -> list[dict[str, Any]] | None:
        """Workers of this queue whose heartbeat is fresh; None when that cannot be known
        (a broker other than Redis)."""
        if not self.settings.broker_url.startswith(REDIS_SCHEMES):
            return None
        return self._on_redis(lambda r: live_workers(r, self.settings.family))

    def aggregate(
        self,
        *,
        by: str = "label",
        source: str | None = None,
        status: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        model: str | None = None,
        lang: str | None = None,
    ) -> list[dict[str, Any]]:
        """Counts and mean score per group (see :meth:`ResultStore.aggregate`)."""
        if by not in ("label", "source", "status", "model", "lang"):
            raise InvalidInput(f"cannot group by {by!r}")
        _filter_args({"source": source, "status": status, "since": since, "until": until,
                      "model": model, "lang": lang})
        def read() -> list[dict[str, Any]]:
            try:
                return self.store.aggregate(
                    by=by, source=source, status=status, since=since, until=until,
                    model=self._model(model), lang=lang,
                )
            except SQLAlchemyError as exc:
                raise self.store.unavailable("cannot read results", exc) from exc

        return self._read(read, [])
