"""Streaming many texts into the queue with backpressure and a progress bar.

Takes source records (:mod:`producer.sources`), validates them one by one,
publishes the good ones in bulk chunks and, before every chunk, waits while
Redis already holds more than ``max_queue_length`` messages, so a fast
reader cannot flood Redis memory while workers lag behind.

Items are buffered until a chunk is full, the source ends, or the oldest
buffered item has waited ``linger_s`` (a slow source such as a tail -f pipe,
quiet or steady, still gets its texts analysed within a fraction of a
second).
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

from tqdm import tqdm

from contract.broker import publish_retry_policy
from contract.errors import BertstreamError, BrokerUnavailable, Interrupted, StreamFailed
from contract.messages import TaskItem
from contract.settings import REDIS_SCHEMES, mask_url
from producer.client import Buffered, ChunkPublisher, Client
from producer.items import ItemError, ItemValidator
from producer.linger import LINGER_S, Linger
from producer.sources import SourceRecord

#: First pause while the queue is full, in seconds; doubles up to the cap.
BACKPRESSURE_START_S = 0.02

#: Records the reader thread reads ahead of the publishing: two default chunks. Each
#: record holds a text of up to the length limit, so this bounds a stream's memory
#: while backpressure waits.
READ_AHEAD = 512

#: Seconds between two backpressure notes (``on_wait``): a queue that stays full pauses a
#: stream before nearly every chunk, and a log would get a line for each pause.
PAUSE_NOTE_EVERY_S = 60.0

#: Caller ids a stream from a source of unknown length (a pipe) remembers to refuse a
#: repeated one: the most recent ones, so its memory does not grow with every line.
RECENT_IDS = 100_000

#: The key a stream writes, after each chunk it publishes, how far it got
#: (:class:`QueueWatch`); the run's own id follows.
WATCH_KEY_PREFIX = "bertstream:stream:"
#: Seconds the key outlives the last chunk: far longer than any backpressure pause.
WATCH_TTL_S = 7 * 24 * 3600

_TICK = object()
_END = object()


def with_ticks(records: Iterable[SourceRecord],
               due: Callable[[], float | None]) -> Iterator[object]:
    """``records``, plus a tick object whenever the time ``due()`` gives has come
    (``time.monotonic``; None: no tick is due), records waiting or not.

    The source is read in a daemon thread (a blocking read of a quiet pipe
    must not hold back the chunk already buffered), at most :data:`READ_AHEAD`
    records ahead; its exceptions re-raise here.
    """
    pipe: queue.Queue[object] = queue.Queue(maxsize=READ_AHEAD)

    def pump() -> None:
        try:
            for record in records:
                pipe.put(record)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            pipe.put(exc)
        pipe.put(_END)

    threading.Thread(target=pump, name="bertstream-source", daemon=True).start()
    while True:
        deadline = due()
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            yield _TICK
            continue
        try:
            got = pipe.get(timeout=wait)
        except queue.Empty:
            yield _TICK
            continue
        if got is _END:
            return
        if isinstance(got, BaseException):
            raise got
        yield got


class Tracker(Protocol):
    """Told what became of each source record: sent (enqueued) or rejected.

    ``sent`` runs after the chunk holding the records was published, in
    source order within the chunk; ``rejected`` runs as the record is refused.
    """

    def sent(self, pairs: Sequence[tuple[SourceRecord, TaskItem]]) -> None:
        """``pairs`` (record, its task) are in the queue."""

    def rejected(self, record: SourceRecord, error: ItemError) -> None:
        """``record`` was refused for ``error`` and will not be sent."""


@dataclass
class StreamReport:
    """What a :func:`stream` run did.

    ``errors`` keeps the first ``max_errors`` refusals (``index`` = line
    number); ``rejected`` counts them all. ``ids`` (when kept) lists accepted
    ids in source order.
    """

    accepted: int = 0
    rejected: int = 0
    #: Blank lines read (no text, not sent, not an error).
    blank: int = 0
    messages: int = 0
    elapsed_s: float = 0.0
    #: Seconds spent paused by backpressure.
    waited_s: float = 0.0
    errors: list[ItemError] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Accepted texts per second over the whole run."""
        return self.accepted / self.elapsed_s if self.elapsed_s > 0 else 0.0


class QueueLost(BrokerUnavailable):
    """Redis came back without the queue a stream filled (restarted without persistence,
    or flushed): the tasks sent from ``resume_line`` on that no worker had taken are gone.
    ``sent`` counts all the items sent, those lost included."""


def _retried(client: Client, call: Callable[[], Any]) -> Any:
    """``call()``, asked again through a Redis restart as a publish would be
    (``publish_retries`` tries, 0.25 s more pause each, capped at
    ``publish_retry_max_s``); then its :class:`BrokerUnavailable` is raised."""
    policy = publish_retry_policy(client.settings)
    tries, pause = policy["max_retries"], policy["interval_start"]
    while True:
        try:
            return call()
        except BrokerUnavailable:
            if tries <= 0:
                raise
            tries -= 1
        time.sleep(pause)
        pause = min(pause + policy["interval_step"], policy["interval_max"])


class QueueWatch:
    """Tells whether Redis lost what a stream queued: a restart without persistence
    empties the queue, and a stream riding the restart out reported every text sent,
    and exited 0, though the queue it filled was gone.

    After each chunk :meth:`sent` writes a key of the run's own (one round trip, with the
    previous value read back): the items sent so far and the line after the chunk. A value
    read back other than the one written last means Redis lost its data since; what it
    kept (the value it still had, written after the chunks it holds) gives the line to
    resume from. :meth:`lost` reads it once more (the source failed, the stream ended).
    The key alone may go too (:meth:`_gone_alone`: evicted, or expired after a quiet
    spell): no loss then, unless Redis restarted meanwhile.
    """

    def __init__(self, client: Client, *, heals: bool = False) -> None:
        self.client = client
        self.key = f"{WATCH_KEY_PREFIX}{uuid.uuid4().hex}"
        self.sent_items = 0
        #: the value written last (None: none yet, or the key went alone: nothing to lose)
        self.last: str | None = None
        #: the line of the first text sent (set by the first chunk)
        self.first_line = 1
        #: False for a broker other than Redis (``memory://``): nothing to watch
        self.on = client.settings.broker_url.startswith(REDIS_SCHEMES)
        #: Redis's run id and evicted keys at the first chunk (None: INFO refused)
        self.server: tuple[str, int] | None = None
        #: when the key was written last (``time.monotonic``)
        self.written_at = 0.0
        #: True for a source that reads again what a Redis rolled back lost (a Redis
        #: Stream on the broker's Redis: its group's acknowledgements roll back with the
        #: queue, so the entries whose messages were lost are handed out again): a loss
        #: is then told only when the source itself fails (its stream or group gone)
        self.heals = heals

    def sent(self, pairs: Sequence[tuple[SourceRecord, TaskItem]]) -> None:
        """A chunk of ``pairs`` was published; raises :class:`QueueLost` when Redis lost
        what came before."""
        if not pairs or not self.on:
            return
        if not self.sent_items:
            self.first_line = pairs[0][0].line
            self.server = self._server()
        self.sent_items += len(pairs)
        value = f"{self.sent_items} {pairs[-1][0].next_line}"

        def swap(r: Any) -> Any:
            with r.pipeline(transaction=True) as pipe:
                pipe.get(self.key)
                pipe.set(self.key, value, ex=WATCH_TTL_S)
                return pipe.execute()[0]

        previous = _retried(self.client, lambda: self.client._on_redis(swap))
        # its own value: the reply of a first try was lost, and the swap tried again
        lost = None if _text(previous) == value else self._lost(previous)
        self.last, self.written_at = value, time.monotonic()
        if lost is not None and not self.heals:
            raise lost

    def rejected(self, record: SourceRecord, error: ItemError) -> None:
        """Nothing to watch: a refused record was not sent."""

    def check(self) -> None:
        """Raise :class:`QueueLost` when Redis lost what this stream sent (before a chunk
        is sent: a Redis that came back empty gets no more, and the resume line is that
        of the first text it lacks)."""
        if not self.on or self.last is None or self.heals:
            return
        lost = self._lost(_retried(self.client, lambda: self.client._on_redis(
            lambda r: r.get(self.key))))
        if lost is not None:
            raise lost

    def lost(self) -> QueueLost | None:
        """:class:`QueueLost` when Redis lost what this stream sent (its key is gone), else
        None; None too when Redis cannot tell now (out of reach: that error is reported)."""
        if not self.on or self.last is None:
            return None
        try:
            return self._lost(self.client._on_redis(lambda r: r.get(self.key)))
        except BrokerUnavailable:
            return None

    def forget(self) -> None:
        """Delete the key (the run ended); a Redis out of reach keeps it until it expires."""
        if self.on and self.last is not None:
            with contextlib.suppress(BrokerUnavailable):
                self.client._on_redis(lambda r: r.delete(self.key))

    def _lost(self, previous: Any) -> QueueLost | None:
        if self.last is None:
            return None
        got = _text(previous)
        if got == self.last:
            return None
        if got is None and self._gone_alone():
            self.last = None  # nothing to compare until the next chunk writes it again
            return None
        kept, resume = (int(x) for x in got.split()) if got else (0, self.first_line)
        url = mask_url(self.client.settings.broker_url)
        return QueueLost(
            f"Redis at {url} lost the queue this stream filled (it restarted without "
            f"persistence, or was flushed): the last {self.sent_items - kept} item(s) sent "
            f"are gone, but for those a worker had taken",
            sent=self.sent_items, resume_line=resume)

    def _gone_alone(self) -> bool:
        """Whether the key went without the queue: Redis evicted keys since the stream
        began (a ``maxmemory-policy`` such as ``volatile-lru`` takes a key with a TTL first;
        the queue has none), or no chunk renewed it for :data:`WATCH_TTL_S`. Not when Redis
        restarted meanwhile (its run id changed): that is a loss."""
        now = self._server()
        if now is not None and self.server is not None:
            if now[0] != self.server[0]:
                return False
            if now[1] > self.server[1]:
                self.server = now  # forgiven once: a later loss is still told
                return True
        return time.monotonic() - self.written_at >= WATCH_TTL_S

    def _server(self) -> tuple[str, int] | None:
        """Redis's run id and count of evicted keys (``INFO``); None when refused."""
        try:
            info = self.client._on_redis(lambda r: r.info())
        except BertstreamError:
            return None
        return str(info.get("run_id")), int(info.get("evicted_keys", 0))


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class Backpressure:
    """Blocks while the broker queue holds more than ``max_queue_length`` messages.

    Polls :meth:`Client.queue_length` with an exponential backoff from
    :data:`BACKPRESSURE_START_S` capped at ``max_backoff_s``. ``on_wait`` is
    called with the queue length each time a pause begins.
    """

    def __init__(
        self,
        client: Client,
        max_queue_length: int,
        *,
        max_backoff_s: float = 1.0,
        on_wait: Callable[[int], None] | None = None,
    ) -> None:
        self.client = client
        self.max_queue_length = max_queue_length
        self.max_backoff_s = max_backoff_s
        self.on_wait = on_wait

    def _length(self) -> int:
        """The queue length, asked again through a Redis restart (:func:`_retried`)."""
        return int(_retried(self.client, self.client.queue_length))

    def wait_for_room(self) -> float:
        """Return once the queue is at or below the bound; give the seconds paused."""
        length = self._length()
        if length <= self.max_queue_length:
            return 0.0
        if self.on_wait is not None:
            self.on_wait(length)
        started = time.monotonic()
        delay = min(BACKPRESSURE_START_S, self.max_backoff_s)
        while length > self.max_queue_length:
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)
            length = self._length()
        return time.monotonic() - started


def stream(
    client: Client,
    records: Iterable[SourceRecord],
    *,
    max_queue_length: int | None = None,
    progress: bool = True,
    source: str | None = None,
    chunk_size: int | None = None,
    keep_ids: bool = True,
    max_errors: int = 1000,
    max_backoff_s: float = 1.0,
    on_wait: Callable[[int], None] | None = None,
    linger_s: float | None = LINGER_S,
    ttl_s: float | None = None,
    trackers: Sequence[Tracker] = (),
    track_ids: bool = True,
    max_tracked_ids: int | None = None,
    rereads_lost: bool = False,
) -> StreamReport:
    """Submit every valid record on the bulk lane; report the rest by line number.

    ``max_queue_length`` defaults to ``settings.max_queue_length`` (messages,
    both lanes); ``source`` tags records without their own; the progress
    bar (tqdm, stderr) counts texts and shows the rate and rejections.
    ``linger_s``: send a partial chunk once its oldest item has waited this
    long, however fast or slow the source (None: only full chunks and the
    last one at the end).
    ``on_wait`` is told the queue length when a backpressure pause begins: at the
    first pause, then at most once per :data:`PAUSE_NOTE_EVERY_S` (a queue that stays
    full pauses before nearly every chunk).
    ``ttl_s``: deadline of every item, in seconds from its submission.
    ``trackers`` are told, in order, what became of every record (an ids file,
    the Redis Stream acks); ``track_ids=False`` stops refusing ids repeated
    within the run (an endless source would remember every one);
    ``max_tracked_ids`` refuses an id repeated among the last that many caller
    ids only (a pipe that may never end): an older one is sent, and the store's
    idempotent upsert and its id check judge it.
    Guarantees: a bad line never stops the stream; every accepted item is
    published before this returns, or before the error of a source that fails
    is raised. Raises :class:`BrokerUnavailable` when
    Redis stays away through the publish retries; the error carries how many
    items were sent (they stay queued) and the line to resume from;
    :class:`QueueLost` (one) when Redis comes back without what was sent
    (:class:`QueueWatch`): the line to resume from is the first it lacks. With
    ``rereads_lost`` (a Redis Stream on the broker's Redis, whose acknowledgements roll
    back with the queue, so it hands out again what Redis lost) only when the source
    fails too (its stream or group gone with Redis's data). A
    KeyboardInterrupt becomes :class:`Interrupted`, carrying the same; the
    buffered items are not published. A source that fails to read, or a tracker that
    fails to write (it raises :class:`StreamFailed`), raises :class:`StreamFailed`
    carrying the same.
    """
    bound = client.settings.max_queue_length if max_queue_length is None else max_queue_length
    report = StreamReport()
    validator = ItemValidator(client.settings, source, ttl_s=ttl_s,
                              track_ids=track_ids and max_tracked_ids is None)
    recent = (_RecentIds(max_tracked_ids)
              if track_ids and max_tracked_ids is not None else None)
    started = time.monotonic()
    bar = tqdm(
        unit=" texts", unit_scale=True, file=sys.stderr, disable=not progress,
        dynamic_ncols=True, mininterval=0.2,
    )

    noted: list[float] = []  # when on_wait was last told

    def on_pause(length: int) -> None:
        # set_description would add ": ", and tqdm one more before a count with no total
        bar.set_description_str(f"queue full ({length} messages), waiting")
        now = time.monotonic()
        if on_wait is not None and (not noted or now - noted[0] >= PAUSE_NOTE_EVERY_S):
            noted[:] = [now]
            on_wait(length)

    pressure = Backpressure(client, bound, max_backoff_s=max_backoff_s, on_wait=on_pause)
    watch = QueueWatch(client, heals=rereads_lost)
    told = [*trackers, watch]  # the watch last: after the ids file and the acks

    def before_send() -> None:
        report.waited_s += pressure.wait_for_room()
        watch.check()  # nothing more sent into a Redis that lost the rest
        # no redraw here: the bar redraws at its own interval, not once per chunk
        bar.set_description_str("", refresh=False)
        bar.set_postfix(rejected=report.rejected, refresh=False)

    def after_send(items: list[TaskItem], origins: list[Any]) -> None:
        pairs = list(zip(origins, items, strict=True))
        for tracker in told:
            tracker.sent(pairs)

    def on_conflict(b: Buffered, reason: str) -> None:
        # counted as accepted when it was buffered; the stored row has another text
        report.accepted -= 1
        if keep_ids:
            report.ids.remove(b.item.id)
        _refuse(b.origin, ItemError(b.line or 0, b.item.id, reason), report, trackers, max_errors)

    publisher: ChunkPublisher | None = None
    next_line = 1  # the line after the last one read
    linger = Linger(linger_s)
    try:
        with _watching(watch), client.chunk_publisher(
            bulk=True, chunk_size=chunk_size, before_send=before_send,
            after_send=after_send, on_conflict=on_conflict,
        ) as publisher:
            feed: Iterable[object] = records if linger_s is None else with_ticks(records, linger.due)
            for record in _sent_before_failing(feed, publisher):
                if record is _TICK:
                    publisher.flush()
                    linger.update(publisher)
                    continue
                rec = cast(SourceRecord, record)
                next_line = rec.next_line
                if rec.blank:
                    report.blank += 1
                    continue
                _take(rec, _check(validator, rec, recent), publisher, report, trackers,
                      keep_ids=keep_ids, max_errors=max_errors)
                bar.update(1)
                linger.update(publisher)
        report.messages = publisher.messages
        bar.set_postfix(rejected=report.rejected, refresh=False)
    except (BrokerUnavailable, KeyboardInterrupt, StreamFailed) as exc:
        raise _stopped(exc, publisher, next_line) from exc
    finally:
        bar.close()
        report.elapsed_s = time.monotonic() - started
    return report


@contextlib.contextmanager
def _watching(watch: QueueWatch) -> Iterator[None]:
    """Run a stream's publishing under ``watch``: once it ends, and when its source fails
    (a Redis Stream that went with Redis's data), :class:`QueueLost` if Redis lost what
    was sent; the watch's key is deleted."""
    try:
        yield
    except (BrokerUnavailable, KeyboardInterrupt, StreamFailed):
        raise
    except Exception as exc:
        lost = watch.lost()
        if lost is not None:
            raise lost from exc
        raise
    else:
        lost = None if watch.heals else watch.lost()  # since the last chunk
        if lost is not None:
            raise lost
    finally:
        watch.forget()


def _sent_before_failing(feed: Iterable[object], publisher: ChunkPublisher) -> Iterator[object]:
    """``feed``; when its source fails (a Redis Stream's group destroyed or key deleted
    while reading), the records it gave before, valid and buffered, are published, then
    its error propagates: they were read, and would be lost or read again otherwise.
    A broker failure or an interrupt propagates at once (nothing more is published)."""
    records = iter(feed)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except (BrokerUnavailable, KeyboardInterrupt):
            raise
        except OSError as exc:  # a read failed (a failing disk or mount): say so, in a line
            publisher.flush()
            raise StreamFailed(f"cannot read the source: {exc.strerror or exc}") from exc
        except Exception:
            publisher.flush()
            raise
        yield record


def _stopped(exc: BaseException, publisher: ChunkPublisher | None,
             next_line: int) -> BrokerUnavailable | Interrupted | StreamFailed:
    """The error a stream stopped by ``exc`` raises: how many items were published and
    the first line not sent (the first buffered one, which was dropped, else the next
    to read)."""
    if isinstance(exc, QueueLost):  # it says where to resume: before what Redis lost
        return QueueLost(exc.reason, sent=exc.sent, resume_line=exc.resume_line)
    sent = publisher.published if publisher is not None else 0
    unsent = publisher.first_unsent_line if publisher is not None else None
    resume = unsent if unsent is not None else next_line
    if isinstance(exc, BrokerUnavailable):
        return BrokerUnavailable(exc.reason, sent=sent, resume_line=resume)
    if isinstance(exc, StreamFailed):
        return StreamFailed(exc.reason, sent=sent, resume_line=resume)
    return Interrupted(sent=sent, resume_line=resume)


def _take(rec: SourceRecord, checked: TaskItem | ItemError, publisher: ChunkPublisher,
          report: StreamReport, trackers: Sequence[Tracker], *, keep_ids: bool,
          max_errors: int) -> None:
    """Count one record; buffer its task, or tell the trackers it was refused."""
    if isinstance(checked, ItemError):
        _refuse(rec, checked, report, trackers, max_errors)
        return
    caller_id = rec.item is not None and rec.item.get("id") is not None
    publisher.add(checked, rec.line, rec, caller_id=caller_id)
    report.accepted += 1
    if keep_ids:
        report.ids.append(checked.id)


def _refuse(rec: SourceRecord, error: ItemError, report: StreamReport,
            trackers: Sequence[Tracker], max_errors: int) -> None:
    if rec.ref is not None:
        error = replace(error, ref=rec.ref)
    report.rejected += 1
    if len(report.errors) < max_errors:
        report.errors.append(error)
    for tracker in trackers:
        tracker.rejected(rec, error)


def _check(validator: ItemValidator, record: SourceRecord,
           recent: _RecentIds | None = None) -> TaskItem | ItemError:
    if record.error is not None:  # refused by the reader: named by the id it gave, if any
        return ItemError(record.line, record.id, record.error)
    checked = validator.check(record.line, record.item)
    if recent is None or isinstance(checked, ItemError) or record.item is None \
            or record.item.get("id") is None:
        return checked
    return recent.check(record.line, checked, record.ref)


class _RecentIds:
    """The last ``limit`` caller ids of a stream and the line (and Redis Stream entry id)
    of each: a repeated one is refused as :class:`ItemValidator` refuses it, in bounded
    memory."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.first: OrderedDict[str, tuple[int, str | None]] = OrderedDict()

    def check(self, line: int, item: TaskItem, ref: str | None = None) -> TaskItem | ItemError:
        """``item``, or why it is refused: its id is among the recent ones. The same
        Redis Stream entry handed out again (``ref``: a Redis back without its last
        writes reads them again) is no repeat: it is sent again, one row."""
        first = self.first.get(item.id)
        if first is not None:
            if ref is not None and first[1] == ref:
                return item
            return ItemError(line, item.id, f"duplicate id {item.id!r} (first at {first[0]})")
        self.first[item.id] = (line, ref)
        if len(self.first) > self.limit:
            self.first.popitem(last=False)
        return item
