"""Five changes to kombu's Redis transport: two halve its cost per message, one closes a gap,
one puts its visibility timeout on the Redis server's clock, one lets a worker reconnect to a
full Redis.

Profiling the worker draining single-text messages (bench/README.md, "Where
the time goes") showed most of its time in kombu's Redis transport, not in
Celery or bertstream:

1. ``Channel.conn_or_acquire()`` builds a new ``redis.Redis`` client object
   for every publish, every receive bookkeeping step and every ack. With
   redis-py 6+ a client's constructor copies ~200 response callbacks into a
   case-insensitive dict: ~0.17 ms, twice per message. Here a channel keeps
   one client per connection pool (clients are thread-safe; connections
   still come from the pool per command, as before).
2. ``QoS.ack()`` runs one MULTI/EXEC round trip per message to drop it from
   the unacked index. :func:`deferred_acks` lets the worker ack a whole flush
   and send those removals in one pipeline. Acks still happen only after the
   commit; a crash between the bookkeeping and the pipeline leaves entries
   that kombu redelivers after the visibility timeout, which the results
   store absorbs (a done row is final), so the at-least-once guarantee is
   unchanged.

3. kombu receives with ``BRPOP`` and records the message in its unacked
   index with a second command. In between, the message exists only in the
   reply: a reply that waits unread in the worker's socket (while a flush
   runs, or while the prefetch window is full) dies with a ``kill -9``, and
   one in flight dies with a Redis restart. Here the worker takes a message
   with a Lua script that records it in the unacked index and pops it in
   one atomic step, so a message is always in a queue or in the index, and
   kombu's visibility-timeout sweep brings back whatever a dead worker held.
   An idle worker waits with ``BLMOVE q q RIGHT RIGHT`` (blocks until the
   first queue it consumes holds a message, and leaves it there); its other
   queues are looked at every :data:`WAIT_S` while it waits. Redis >= 6.2.

   A list item kombu cannot make a message of (not JSON, a body its
   encoding cannot decode, an envelope it cannot record) would make kombu
   raise out of the worker's event loop; recorded by the script, it would
   come back after the visibility timeout and stop the next worker too.
   Such an item is moved to ``<queue>.undeliverable`` (the newest
   :data:`UNDELIVERABLE_KEEP`) and out of the unacked index, with an error
   in the log (at most one line per queue every :data:`PARK_LOG_EVERY_S`),
   and the worker goes on. What of it can be read (the envelope's headers,
   the body) goes to the handler the worker registered
   (:func:`on_undeliverable`), which fails the tasks whose ids it finds (after
   a database outage, once the database answers again): the transport knows
   no database. kombu's own ``BRPOP`` receive
   (``atomic_receive=False``, or a ``global_keyprefix``) parks such an item
   the same way (it used to stop the worker, and the item was lost).

4. kombu scores a message in its unacked index with the receiving worker's
   clock, and any worker's visibility sweep restores the ones scored longer
   ago than the visibility timeout by the sweeper's own clock. Workers run on
   several hosts: a sweeper whose clock is ahead of the receiver's by more
   than the timeout restores messages still in flight (a second delivery,
   counted: past ``max_attempts`` a healthy message is dead-lettered), and a
   receiver whose clock is behind has its messages restored by every other
   worker. Here receiving, renewing (:func:`keep_visible`) and sweeping read
   the server's ``TIME``, one clock for every host (the receive script reads
   it itself; kombu's own receive pays one round trip more per message), for
   the kombu versions in :data:`SERVER_CLOCK_KOMBU` (kombu's ``append`` and
   ``restore_visible`` are replaced, so the guard is on its version); with
   another kombu all use the local clock, as kombu does.

5. Celery declares the worker's queues each time its consumer (re)connects:
   kombu counts each queue's messages in a MULTI/EXEC (a full noeviction
   Redis refuses every command queued in one, reads too) and adds the
   queue's bindings again (SADD, refused when full, though they are there).
   A worker whose connection dropped while Redis was full ended on the
   refused reply ("Unrecoverable error"). Here the counts are read without
   MULTI, and a binding already in place is not written again when Redis is
   full. kombu's own BRPOP (``atomic_receive=False``) pops from a full Redis
   and then has its record refused: such an item is kept and pushed back to
   its queue once Redis takes writes (:func:`_hold`), not parked as unreadable.

A worker holding a message on purpose renews its place in the unacked
index with :func:`keep_visible`, so the sweep does not take it for a dead
worker's.

:func:`install` applies them, once, only when kombu's internals look as
expected (otherwise kombu is left alone and a debug line says why).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from time import monotonic, time
from typing import Any

from redis.exceptions import OutOfMemoryError

from contract.clock import server_time

log = logging.getLogger(__name__)

_INSTALLED = False
_SERVER_CLOCK = False  # the unacked index is scored and swept by the Redis server's clock
#: kombu versions (from, below) whose ``QoS.append`` and ``QoS.restore_visible`` this module
#: replaces by ones on the server's clock: their code was read for these (pyproject's pin).
SERVER_CLOCK_KOMBU = ((5, 4), (5, 8))
_DEFERRED = "_bertstream_deferred_acks"
_SENT = "_bertstream_sent"  # the command in flight on a channel's receive connection
_WAITING = "_bertstream_waiting"  # the last pop found every queue empty: wait next
_PAUSE = "_bertstream_pause"  # Redis refused the last command: pause WAIT_S, then again
_WARNED = "_bertstream_warned_at"
_SWEEP_WARNED = "_bertstream_sweep_warned_at"  # the last "sweep refused: Redis full" warning
_RECORDED = "_bertstream_recorded"  # the delivery tag the script already recorded
_HANDED = "_bertstream_handed"  # kombu built and recorded the message being delivered
_PARK_LOG = "_bertstream_park_log"  # per queue: when the last parking was logged, and since
_HELD_BACK = "_bertstream_held_back"  # (key, item) BRPOP popped from a full Redis, not back yet

#: Longest an idle worker takes to see a message on a queue other than its first.
WAIT_S = 0.1
#: A list nothing is ever pushed to: a blocking pop on it is a server-side pause.
PAUSE_KEY = "bertstream.receive.pause"
#: An item kombu cannot read from queue Q is kept on the list Q + this suffix...
UNDELIVERABLE_SUFFIX = ".undeliverable"
#: ... which holds the newest this many (older ones are dropped).
UNDELIVERABLE_KEEP = 1000
#: At most one error line per queue this often about parked items (the others are counted).
PARK_LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class Undeliverable:
    """A list item :func:`_park` took out of ``queue``, and what of it can be read.

    ``headers``: the kombu envelope's headers (None when the item is no JSON
    object with a headers object); ``body``: its body decoded as JSON (None
    when it cannot be); ``side``: the list that keeps it (None: dropped).
    """

    queue: str
    item: bytes
    reason: str
    side: str | None
    headers: dict[str, Any] | None
    body: Any


#: Gives what it did with a parked item (for the log line), or None; never raises.
UndeliverableHandler = Callable[[Undeliverable], str | None]
_HANDLER: UndeliverableHandler | None = None


def on_undeliverable(handler: UndeliverableHandler | None) -> UndeliverableHandler | None:
    """Hand every item parked from now on in this process to ``handler``; gives the one before.

    The worker registers one that fails the tasks it can read (worker/tasks.py).
    """
    global _HANDLER
    previous, _HANDLER = _HANDLER, handler
    return previous

# KEYS: unacked index, unacked hash, then the lists in BRPOP's order. ARGV: the time to
# score with, or '' for the server's clock.
# The message is recorded before it is popped, so a write refused half-way
# (a full noeviction server) leaves it in its list. Anything that is not a
# kombu message is popped and handed back unrecorded, as BRPOP would.
POP_AND_RECORD = """
for i = 3, #KEYS do
  local item = redis.call('LINDEX', KEYS[i], -1)
  if item then
    local ok, m = pcall(cjson.decode, item)
    local tag, ex, rk
    if ok and type(m) == 'table' and type(m['properties']) == 'table' then
      local p = m['properties']
      tag = p['delivery_tag']
      if type(p['delivery_info']) == 'table' then
        ex, rk = p['delivery_info']['exchange'], p['delivery_info']['routing_key']
      end
    end
    if type(tag) == 'string' and type(ex) == 'string' and type(rk) == 'string' then
      local now = ARGV[1]
      if now == '' then
        local t = redis.call('TIME')
        now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
      end
      redis.call('ZADD', KEYS[1], now, tag)
      redis.call('HSET', KEYS[2], tag,
                 '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      redis.call('RPOP', KEYS[i])
      return {KEYS[i], item, tag}
    end
    redis.call('RPOP', KEYS[i])
    return {KEYS[i], item}
  end
end
return false
"""


def install(*, atomic_receive: bool = True) -> bool:
    """Patch kombu's Redis Channel and QoS (idempotent); True when patched.

    ``atomic_receive=False`` keeps kombu's own ``BRPOP`` command (for a
    Redis-compatible server without Lua scripting or ``BLMOVE``); its reply
    is read by :func:`_receive_read` all the same, which parks what kombu
    cannot read. The last call decides, for every channel.
    """
    if not _patch():
        return False
    from kombu.transport import redis as kredis

    kredis.Channel._brpop_start = (  # type: ignore[method-assign]
        _receive_start if atomic_receive else _brpop_start)
    kredis.Channel._brpop_read = _receive_read  # type: ignore[method-assign]
    return True


def _patch() -> bool:
    """The speed-ups and the recorded-append, once; False when kombu does not look as expected."""
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        from kombu.transport import redis as kredis
        from kombu.transport import virtual
    except ImportError as exc:  # redis extra missing: nothing to speed up
        log.debug("kombu redis speed-ups not installed: %s", exc)
        return False
    channel, qos = kredis.Channel, kredis.QoS
    needed = [(channel, "_create_client"), (channel, "conn_or_acquire"),
              (qos, "ack"), (qos, "_remove_from_indices"), (virtual.QoS, "ack"),
              (channel, "_brpop_start"), (channel, "_brpop_read"), (channel, "_q_for_pri"),
              (channel, "_in_poll"), (channel, "_brpop_sent_at"), (channel, "sep"),
              (qos, "append"), (virtual.QoS, "append"), (qos, "unacked_index_key"),
              (virtual.Transport, "_deliver"), (channel, "_size"), (channel, "_queue_bind"),
              (channel, "keyprefix_queue"), (channel, "keyprefix_binding_permanent"),
              (channel, "priority_steps")]
    missing = [f"{cls.__name__}.{name}" for cls, name in needed if not hasattr(cls, name)]
    if missing:
        log.debug("kombu redis speed-ups not installed: kombu lacks %s", missing)
        return False

    original_ack = qos.ack
    original_append = qos.append
    _ORIGINAL.update(start=channel._brpop_start, append=original_append)

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_bertstream_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, self._create_client())
            self.__dict__["_bertstream_client"] = cached
        yield cached[1]

    def ack(self: Any, delivery_tag: Any) -> None:
        pending = self.__dict__.get(_DEFERRED)
        if pending is None:
            original_ack(self, delivery_tag)
            return
        pending.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # in-process bookkeeping only

    def append(self: Any, message: Any, delivery_tag: Any) -> None:
        if delivery_tag is not None and self.__dict__.get(_RECORDED) == delivery_tag:
            del self.__dict__[_RECORDED]
            virtual.QoS.append(self, message, delivery_tag)  # Redis has it already
        else:
            _record(self, message, delivery_tag)
        # What fails from here on is the consumer's, not the item's (a flag on the
        # transport: the consuming channel may not be the one that received it).
        receiving = self.channel.connection.__dict__
        if _HANDED in receiving:
            receiving[_HANDED] = True

    _ORIGINAL["bind"] = channel._queue_bind
    channel._size = _size  # type: ignore[method-assign]
    channel._queue_bind = _queue_bind  # type: ignore[method-assign]
    channel.conn_or_acquire = conn_or_acquire  # type: ignore[method-assign]
    qos.ack = ack  # type: ignore[method-assign]
    qos.append = append  # type: ignore[method-assign]
    _INSTALLED = True
    _patch_clock(kredis)
    return True


def server_clock_refusal(version: tuple[Any, ...], kredis: Any) -> str | None:
    """Why kombu ``version`` (``kombu.VERSION``) cannot have its unacked index on the
    server's clock (:func:`_patch_clock`), or None when it can."""
    low, high = SERVER_CLOCK_KOMBU
    if not low <= tuple(version[:2]) < high:
        return (f"kombu {'.'.join(map(str, version[:3]))} is not one of {low[0]}.{low[1]} to "
                f"below {high[0]}.{high[1]}")
    missing = [name for name in ("Mutex", "MutexHeld") if not hasattr(kredis, name)]
    missing += [f"QoS.{name}" for name in ("restore_visible", "restore_by_tag",
                                           "pipe_or_acquire", "unacked_key")
                if not hasattr(kredis.QoS, name)]
    return f"kombu lacks {missing}" if missing else None


def _patch_clock(kredis: Any) -> bool:
    """Put receiving, renewing and sweeping on the server's clock (point 4 above) when
    kombu is one this was written for; True when done."""
    global _SERVER_CLOCK
    import kombu

    refusal = server_clock_refusal(tuple(kombu.VERSION), kredis)
    _SERVER_CLOCK = refusal is None
    if refusal is not None:
        log.warning("the visibility timeout stays on each worker's own clock (hosts whose "
                    "clocks are apart restore each other's messages early): %s", refusal)
        return False
    kredis.QoS.restore_visible = _restore_visible
    return True


def _size(self: Any, queue: str) -> int:
    """kombu's ``Channel._size`` (a queue's messages, every priority) without MULTI/EXEC,
    which a full Redis refuses even for reads (point 5 above)."""
    with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
        for pri in self.priority_steps:
            pipe.llen(self._q_for_pri(queue, pri))
        return sum(n for n in pipe.execute() if isinstance(n, int))


def _queue_bind(self: Any, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
    """kombu's ``Channel._queue_bind``; when a full Redis refuses it, done all the same if
    the binding is in place already (point 5 above)."""
    try:
        _ORIGINAL["bind"](self, exchange, routing_key, pattern, queue)
    except OutOfMemoryError:
        member = self.sep.join([routing_key or "", pattern or "", queue or ""])
        keys = [self.keyprefix_queue % (exchange,)]
        if queue not in getattr(self, "_expires", {}):
            keys.append(self.keyprefix_binding_permanent % (exchange,))
        with self.conn_or_acquire() as client:
            if not all(client.sismember(key, member) for key in keys):
                raise


def _now(client: Any) -> float:
    """When to score a delivery at: by the server's clock where it is in use."""
    return server_time(client) if _SERVER_CLOCK else time()


def _record(qos: Any, message: Any, delivery_tag: Any) -> None:
    """kombu's ``QoS.append``, on the server's clock where it is in use: the delivery goes
    into the unacked index and hash (kombu's own receive, which recorded nothing yet)."""
    from kombu.transport import virtual
    from kombu.utils.json import dumps

    if not _SERVER_CLOCK:
        _ORIGINAL["append"](qos, message, delivery_tag)
        return
    delivery = message.delivery_info
    with qos.channel.conn_or_acquire() as client:
        now = server_time(client)
        with qos.pipe_or_acquire(client=client) as pipe:
            pipe.zadd(qos.unacked_index_key, {delivery_tag: now}).hset(
                qos.unacked_key, delivery_tag,
                dumps([message._raw, delivery["exchange"], delivery["routing_key"]])).execute()
    virtual.QoS.append(qos, message, delivery_tag)


def _restore_visible(self: Any, start: int = 0, num: int | None = 10,
                     interval: int = 10) -> None:
    """kombu's ``QoS.restore_visible`` with its cut-off on the server's clock: restore the
    unacked messages scored longer ago than the visibility timeout (every ``interval``-th
    call, under kombu's mutex, at most ``num``)."""
    from kombu.transport import redis as kredis

    self._vrestore_count = getattr(self, "_vrestore_count", 0) + 1
    if (self._vrestore_count - 1) % (interval or 1):
        return
    with self.channel.conn_or_acquire() as client:
        try:
            with kredis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                ceil = server_time(client) - self.visibility_timeout
                visible = client.zrange(self.unacked_index_key, ceil, 0, desc=True,
                                        byscore=True, offset=num and start, num=num,
                                        withscores=True)
                for tag, _score in visible or []:
                    self.restore_by_tag(tag, client)
        except kredis.MutexHeld:
            pass
        except OutOfMemoryError as exc:
            # A full noeviction Redis refuses the mutex and the restores: nothing to
            # restore until it takes writes again. A traceback each sweep ("Error in
            # timer") said no more.
            now = monotonic()
            if now - self.__dict__.get(_SWEEP_WARNED, -600.0) >= 60:
                self.__dict__[_SWEEP_WARNED] = now
                log.warning("Redis is out of memory (maxmemory reached): the visibility "
                            "sweep restores unacked messages once it takes writes again "
                            "(%s)", exc)


_ORIGINAL: dict[str, Any] = {}


def _receive_start(self: Any, timeout: float | None = None) -> None:
    """Send the next receive command: the atomic pop, or a wait when the last pop found nothing."""
    if timeout is None:
        timeout = self.brpop_timeout
    queues = self._queue_cycle.consume(len(self.active_queues))
    if not queues:
        return
    if self.global_keyprefix:  # kombu prefixes its keys itself: its own BRPOP
        _brpop_start(self, timeout)
        return
    keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
    if self.__dict__.pop(_PAUSE, False):
        # BLPOP frees memory, so even a full noeviction server accepts it.
        command: tuple[Any, ...] = ("BLPOP", PAUSE_KEY, WAIT_S)
    elif self.__dict__.get(_WAITING):
        first = self._q_for_pri(self.active_queues[0], 0)
        wait = (timeout or 0) if keys == [first] else min(timeout or WAIT_S, WAIT_S)
        command = ("BLMOVE", first, first, "RIGHT", "RIGHT", wait)
    else:
        command = ("EVAL", POP_AND_RECORD, 2 + len(keys), self.unacked_index_key,
                   self.unacked_key, *keys, "" if _SERVER_CLOCK else repr(time()))
    connection = self.client.connection
    self.__dict__[_SENT] = command[0]
    self._in_poll = connection
    self._brpop_sent_at = monotonic()
    connection.send_command(*command)


def _brpop_start(self: Any, timeout: Any = None) -> None:
    """kombu's ``BRPOP``, unless messages it popped from a full Redis are not back on their
    queues yet (:func:`_hold`): then they go back first, and while Redis still refuses
    them the receive pauses (a blocking pop on :data:`PAUSE_KEY`) instead of popping more."""
    if self.__dict__.get(_HELD_BACK) and not _push_back(self):
        connection = self.client.connection
        self.__dict__[_SENT] = "BLPOP"
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        connection.send_command("BLPOP", PAUSE_KEY, WAIT_S)
        return
    self.__dict__[_SENT] = "BRPOP"
    _ORIGINAL["start"](self, timeout)


def _hold(self: Any, key: Any, item: Any, exc: Exception) -> None:
    """Keep an item ``BRPOP`` popped whose record a full Redis refused: a pop frees memory,
    so a full noeviction Redis takes it, and then refuses the record in the unacked index.
    Parked, it was dropped and its tasks failed for the outage. It goes back to the tail
    it came from (:func:`_push_back`, now or before the next pop), next to be popped.
    Held in this process only: one that exits first loses it, as BRPOP's gap does."""
    from kombu.utils.encoding import bytes_to_str

    self.__dict__.setdefault(_HELD_BACK, []).append((bytes_to_str(key), item))
    now = monotonic()
    if now - self.__dict__.get(_WARNED, -600.0) >= 60:
        self.__dict__[_WARNED] = now
        log.warning("Redis is full (maxmemory) and refused to record a message kombu's BRPOP "
                    "took (%s); it goes back to its queue once Redis takes writes again", exc)
    _push_back(self)


def _push_back(self: Any) -> bool:
    """Put the items :func:`_hold` keeps back on their queues' tails, the latest popped first
    (so the oldest is popped next again); False while Redis refuses them."""
    held = self.__dict__.get(_HELD_BACK) or []
    with self.conn_or_acquire() as client:
        while held:
            key, item = held[-1]
            try:
                # With a global key prefix, kombu's client took it off the popped key and
                # adds it to RPUSH again.
                client.rpush(key, item)
            except OutOfMemoryError:
                return False
            held.pop()
    return True


def _receive_read(self: Any, **options: Any) -> bool:
    """Read the reply of :func:`_receive_start` (or of kombu's own ``BRPOP``); deliver a
    popped message (the script's is recorded already, ``BRPOP``'s is not).

    An item kombu cannot make a message of is parked (:func:`_park`) and the
    read ends as an empty pop; what the consumer raises, once kombu handed it
    the message, propagates as before.
    """
    from queue import Empty

    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import loads

    sent = self.__dict__.pop(_SENT, "BRPOP")  # kombu's own start sends BRPOP
    reply = _read_reply(self, sent, options)
    if sent == "BRPOP":  # kombu's command: what it popped is unrecorded
        if not reply:
            raise Empty()
    elif sent != "EVAL" or not reply:
        # After a wait or a pause, pop (something may have come); after an empty pop, wait.
        self.__dict__[_WAITING] = sent == "EVAL"
        raise Empty()
    else:
        self.__dict__[_WAITING] = False
    key, item, *tag = reply
    dest = bytes_to_str(key).rsplit(self.sep, 1)[0]
    self._queue_cycle.rotate(dest)
    recorded = bytes_to_str(tag[0]) if tag else None
    try:
        payload = loads(bytes_to_str(item))
    except Exception as exc:  # not JSON, or nested past the parser's depth
        _park(self, dest, item, recorded, exc)
        raise Empty() from exc
    if recorded is not None:
        self.qos.__dict__[_RECORDED] = recorded
    transport = self.connection.__dict__
    transport[_HANDED] = False
    try:
        self.connection._deliver(payload, dest)
    except Exception as exc:
        # kombu counts KeyError among the Redis connection errors; raised while kombu
        # builds the message, it is a field the item lacks (its delivery tag, say).
        redis_gone = isinstance(exc, self.connection_errors) and not isinstance(exc, KeyError)
        if transport.get(_HANDED) or redis_gone:
            raise  # kombu made a message of it and handed it on, or Redis went away
        if sent == "BRPOP" and isinstance(exc, OutOfMemoryError):  # the record refused
            _hold(self, key, item, exc)
            raise Empty() from exc
        _park(self, dest, item, recorded, exc)
        raise Empty() from exc
    finally:
        self.qos.__dict__.pop(_RECORDED, None)
        transport.pop(_HANDED, None)
    return True


def _read_reply(self: Any, sent: str, options: dict[str, Any]) -> Any:
    """The reply to the receive command ``sent``, read off the channel's connection."""
    from queue import Empty

    from redis.exceptions import ResponseError

    try:
        return self.client.parse_response(self.client.connection, sent, **options)
    except self.connection_errors:
        self.client.connection.disconnect()
        raise
    except ResponseError as exc:
        if sent == "BRPOP":
            raise  # as kombu's own read
        # A full noeviction server refuses the script's writes (nothing
        # was popped), a Redis older than 6.2 has no BLMOVE: pause, then
        # pop again. kombu's BRPOP would pop and then fail to record.
        now = monotonic()
        if now - self.__dict__.get(_WARNED, -600.0) >= 60:
            self.__dict__[_WARNED] = now
            log.warning("Redis refused %s (%s); messages stay queued, trying again "
                        "every %.1f s", sent, exc, WAIT_S)
        self.__dict__[_PAUSE] = True
        self.__dict__[_WAITING] = False
        raise Empty() from exc
    finally:
        self._in_poll = None
        flush_reauth = getattr(self, "_flush_brpop_reauth", None)
        if flush_reauth is not None:
            flush_reauth()


def _park(self: Any, dest: str, item: bytes, recorded: str | None, exc: Exception) -> None:
    """Move an item kombu cannot deliver to ``dest`` + :data:`UNDELIVERABLE_SUFFIX`.

    In one transaction it is pushed there (the list trimmed to the newest
    :data:`UNDELIVERABLE_KEEP`) and its record, if the receive script made
    one, leaves the unacked index: it is neither redelivered nor lost
    silently. A full noeviction server refuses the copy: the item is dropped.
    Either way the registered handler (:func:`on_undeliverable`) gets it.
    """
    from redis.exceptions import ResponseError

    side = dest + UNDELIVERABLE_SUFFIX
    kind = type(exc)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    reason = f"{name}: {exc}"[:300]
    with self.conn_or_acquire() as client:
        # kombu's prefixing client (global_keyprefix) prefixes LPUSH but not LTRIM.
        prefixes_ltrim = "LTRIM" in getattr(client, "PREFIXED_SIMPLE_COMMANDS", ("LTRIM",))
        trimmed = side if prefixes_ltrim else f"{self.global_keyprefix or ''}{side}"
        for keep in (True, False):
            pipe = client.pipeline()
            if keep:
                pipe.lpush(side, item).ltrim(trimmed, 0, UNDELIVERABLE_KEEP - 1)
            if recorded is not None:
                self.qos._remove_from_indices(recorded, pipe)
            try:
                pipe.execute()
                break
            except ResponseError as refused:
                if not keep:
                    raise
                reason = f"{reason}; not kept: {refused}"
    raw = item.encode() if isinstance(item, str) else bytes(item)
    done = _hand_over(Undeliverable(dest, raw, reason, side if keep else None, *_readable(raw)))
    # One line per queue per PARK_LOG_EVERY_S: a flood of bad items must not flood the log.
    logged = self.__dict__.setdefault(_PARK_LOG, {})
    now = monotonic()
    last, since = logged.get(dest, (None, 0))
    if last is not None and now - last < PARK_LOG_EVERY_S:
        logged[dest] = (last, since + 1)
        return
    logged[dest] = (now, 0)
    log.error("queue %s: an item that is not a message kombu can read (%s) was %s%s%s",
              dest, reason, f"moved to {side}" if keep else "dropped",
              f"; {done}" if done else "",
              f" ({since} more parked since the last such line, not logged)" if since else "")


def _readable(item: bytes) -> tuple[dict[str, Any] | None, Any]:
    """The envelope's headers and its body decoded as JSON, as far as they read (else None)."""
    try:
        envelope = json.loads(item)
    except Exception:  # noqa: BLE001 - not JSON at all
        return None, None
    if not isinstance(envelope, dict):
        return None, None
    headers = envelope.get("headers")
    headers = headers if isinstance(headers, dict) else None
    body, properties = envelope.get("body"), envelope.get("properties")
    encoding = properties.get("body_encoding") if isinstance(properties, dict) else None
    try:
        if isinstance(body, str) and encoding == "base64":
            return headers, json.loads(base64.b64decode(body, validate=True))
        if isinstance(body, str) and str(encoding or "utf-8").lower() == "utf-8":
            return headers, json.loads(body)
    except Exception:  # noqa: BLE001 - a body that does not decode
        pass
    return headers, None


def _hand_over(parked: Undeliverable) -> str | None:
    """Give ``parked`` to the registered handler; gives what it did, never raises."""
    handler = _HANDLER
    if handler is None:
        return None
    try:
        return handler(parked)
    except Exception as exc:  # noqa: BLE001 - never out of the event loop
        log.exception("the handler of undeliverable items failed")
        return f"its handler failed: {type(exc).__name__}"


def keep_visible(messages: list[Any]) -> None:
    """Score these unacked messages at the current time (the server's clock, where the
    sweep uses it: see point 4 above) in kombu's unacked index.

    kombu's visibility sweep (any worker's) restores every unacked message
    recorded longer ago than the visibility timeout, as if its worker had
    died. A worker that holds a message on purpose (a long text scored over
    many flushes) renews it here. ``ZADD XX``: a message no longer recorded
    (acked, or restored already) is not recorded again. Two round trips per
    channel (``TIME``, ``ZADD``); channels of other transports (memory://) are left alone.
    """
    tags: dict[int, tuple[Any, list[Any]]] = {}
    for m in messages:
        qos = getattr(getattr(m, "channel", None), "qos", None)
        tag = getattr(m, "delivery_tag", None)
        if tag is None or not _INSTALLED or not hasattr(qos, "_remove_from_indices"):
            continue
        tags.setdefault(id(qos), (qos, []))[1].append(tag)
    for qos, renewed in tags.values():
        with qos.channel.conn_or_acquire() as client:
            now = _now(client)
            client.zadd(qos.unacked_index_key, dict.fromkeys(renewed, now), xx=True)


def forget(message: Any) -> None:
    """Drop ``message`` from its channel's in-process record of unacked deliveries (kombu's
    ``QoS._delivered``), leaving Redis as it is: for a delivery whose reject Redis refused,
    which otherwise counts against the prefetch limit until its copy, restored from the
    unacked index by the visibility sweep, comes back to this worker (if ever). Never
    raises."""
    from kombu.transport import virtual

    qos = getattr(getattr(message, "channel", None), "qos", None)
    tag = getattr(message, "delivery_tag", None)
    if isinstance(qos, virtual.QoS) and tag is not None:
        with suppress(Exception):  # bookkeeping only: a message it no longer holds
            virtual.QoS.ack(qos, tag)


@contextmanager
def deferred_acks(channels: list[Any]) -> Iterator[None]:
    """Within the block, acks on these channels' Redis QoS are sent in one pipeline at exit.

    Channels of other transports (memory://) are left as they are. The
    pipeline runs even when the block raises, for the acks made before.
    """
    qoses = []
    for ch in {id(c): c for c in channels if c is not None}.values():
        qos = getattr(ch, "qos", None)
        if qos is not None and hasattr(qos, "_remove_from_indices") and _INSTALLED:
            qos.__dict__[_DEFERRED] = []
            qoses.append(qos)
    try:
        yield
    finally:
        for qos in qoses:
            tags = qos.__dict__.pop(_DEFERRED, [])
            if not tags:
                continue
            with qos.channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                for tag in tags:
                    qos._remove_from_indices(tag, pipe)
                pipe.execute()
