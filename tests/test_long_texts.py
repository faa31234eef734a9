"""Long texts scored whole: windows, their combined score, their rows, the read paths.

The tiny BERT with ``max_length=32`` makes a few sentences a long text.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from contract.errors import ConfigError
from contract.results import ResultRecord, ResultStore, WindowRecord, utcnow
from contract.settings import Settings
from producer.client import Client
from worker.app import build_runner
from worker.flush import FlushProcessor
from worker.runner import HFRunner, Prediction
from worker.windows import (
    Window,
    combine,
    overlap_tokens,
    plan_windows,
    sentence_spans,
    split_windows,
)

MAX_LENGTH = 32
SENTENCES = ["the hotel is good. ", "the room was dirty and the service was bad! ",
             "这家酒店的服务很好。", "房间也很干净！", "\n", "i love this phone? ",
             "the train was late again and the coffee was cold. "]


def long_text(n: int = 24, extra: str = "") -> str:
    return "".join(SENTENCES[i % len(SENTENCES)] for i in range(n)) + extra


@pytest.fixture
def tiny_settings(tiny_model_dir: Path) -> Settings:
    return Settings(model=str(tiny_model_dir), database_url="sqlite://", max_length=MAX_LENGTH)


@pytest.fixture
def runner(tiny_settings: Settings) -> HFRunner:
    r = build_runner(tiny_settings)
    assert isinstance(r, HFRunner)
    return r


def test_setting_is_validated() -> None:
    assert Settings.from_env({}).long_texts == "chunk"
    assert Settings.from_env({"BERTSTREAM_LONG_TEXTS": "truncate"}).long_texts == "truncate"
    with pytest.raises(ConfigError, match="LONG_TEXTS"):
        Settings.from_env({"BERTSTREAM_LONG_TEXTS": "split"})
    with pytest.raises(ConfigError, match="WINDOW_SLICE_MS"):
        Settings.from_env({"BERTSTREAM_WINDOW_SLICE_MS": "-1"})


def test_sentences_tile_the_text() -> None:
    text = "Good. 3.14 is pi! Really?? 很好。不错！\n\nnew line"
    spans = sentence_spans(text)
    assert [text[a:b] for a, b in spans] == ["Good. ", "3.14 is pi! ", "Really?? ", "很好。",
                                             "不错！\n\n", "new line"]
    assert sentence_spans("") == []


def test_windows_fit_and_end_at_sentence_boundaries(runner: HFRunner) -> None:
    text = long_text()
    # a window's span leaves out the whitespace at its edges
    spans = [(a + len(text[a:b]) - len(text[a:b].lstrip()), a + len(text[a:b].rstrip()))
             for a, b in sentence_spans(text)]
    starts, ends = {a for a, _ in spans}, {b for _, b in spans}
    windows = split_windows(runner, text)
    assert len(windows) > 3
    budget = MAX_LENGTH - runner.special_tokens
    for w in windows:
        assert w.start in starts and w.end in ends, (w.start, w.end)
        assert not w.encoded.truncated and w.tokens <= MAX_LENGTH
        # the window's tokens are its text encoded alone
        assert w.encoded.ids == runner.encode([text[w.start:w.end]])[0].ids
    assert windows[0].start == 0 and windows[-1].end == len(text.rstrip())
    for before, after in zip(windows, windows[1:], strict=False):
        assert not text[before.end:after.start].strip()  # no gap but whitespace
        if after.start < before.end:  # overlap: one sentence, bounded in tokens
            repeated = text[after.start:before.end]
            assert (after.start, before.end) in spans, repeated
            assert len(runner.offsets(repeated)) <= overlap_tokens(budget)
    assert any(a.start < b.end for b, a in zip(windows, windows[1:], strict=False))


def test_a_sentence_longer_than_a_window_is_cut_at_tokens(runner: HFRunner) -> None:
    text = "the movie was good and " * 30 + "the end."
    windows = split_windows(runner, text)
    assert len(windows) >= 5
    # pieces never overlap; only the whitespace between them is in none
    assert " ".join(text[w.start:w.end] for w in windows) == text
    starts = {a for a, _ in runner.offsets(text)}
    for w in windows:
        assert w.tokens <= MAX_LENGTH and not w.encoded.truncated
        assert w.start == 0 or w.start in starts  # cut where a token begins


def test_plan_on_spans_alone() -> None:
    # one token per character, budget 4: "ab. " "cd. " fit together, "efghij" is cut;
    # a window leaves out the whitespace at its edges
    text = "ab. cd. efghij"
    offsets = [(i, i + 1) for i, ch in enumerate(text) if not ch.isspace()]
    assert plan_windows(text, offsets, 6) == [(0, 7), (8, 14)]
    assert plan_windows(text, offsets, 4) == [(0, 3), (4, 7), (8, 12), (12, 14)]


def test_combine_is_the_token_weighted_mean() -> None:
    def w(n: int, tokens: int, pos: float) -> Window:
        from worker.runner import Encoded

        scores = {"negative": 1 - pos, "positive": pos}
        label = max(scores, key=scores.__getitem__)
        return Window(n, 0, 1, Encoded([0] * tokens, False), Prediction(label, scores[label],
                                                                        scores))

    out = combine([w(0, 30, 0.9), w(1, 10, 0.1)])
    assert isinstance(out, Prediction)
    assert out.label == "positive" and out.score == pytest.approx((30 * 0.9 + 10 * 0.1) / 40)
    assert combine([w(0, 30, 0.9), w(1, 10, 0.1)], neutral_below=0.8).label == "neutral"
    failed = [w(0, 30, 0.9), Window(1, 1, 2, w(0, 1, 0.5).encoded, "model error")]
    assert combine(failed) == "window 2 of 2 failed: model error"


def _score_alone(runner: HFRunner, text: str) -> Prediction:
    enc = runner.encode([text])
    return runner.decode(runner.forward(runner.collate(enc, [0])))[0]


def test_chunked_result_is_the_windows_scored_one_by_one(
    tiny_settings: Settings, runner: HFRunner, store: ResultStore
) -> None:
    proc = FlushProcessor(runner, store, tiny_settings.replace(token_budget=256), "t@h")
    text = long_text(30)
    now = time.time()
    stats = proc.process([("m1", [[{"id": "long", "text": text, "submitted_at": now},
                                   {"id": "short", "text": "the hotel is good",
                                    "submitted_at": now}]])])
    assert stats.failed == 0
    row, windows = store.get_windows("long")
    assert row is not None and row.status == "done"
    assert row.windows == len(windows) > 3 and row.truncated is False
    assert row.tokens == len(runner.offsets(text)) + runner.special_tokens
    expected = []
    for n, w in enumerate(windows):
        assert w.window == n and w.model == row.model
        alone = _score_alone(runner, text[w.start_char:w.end_char])
        assert w.label == alone.label and w.score == pytest.approx(alone.score, abs=1e-5)
        assert w.tokens == len(runner.encode([text[w.start_char:w.end_char]])[0].ids)
        expected.append((w.tokens, alone.scores))
    total = sum(t for t, _ in expected)
    mean = {k: sum(t * s[k] for t, s in expected) / total for k in expected[0][1]}
    best = max(mean, key=mean.__getitem__)
    assert row.label == best and row.score == pytest.approx(mean[best], abs=1e-5)
    assert row.scores == pytest.approx(mean, abs=1e-5)
    short, none = store.get_windows("short")
    assert short is not None and short.windows is None and none == []


def test_truncate_keeps_the_cut(tiny_settings: Settings, runner: HFRunner,
                                store: ResultStore) -> None:
    s = tiny_settings.replace(long_texts="truncate")
    proc = FlushProcessor(runner, store, s, "t@h")
    proc.process([("m1", [[{"id": "long", "text": long_text(), "submitted_at": time.time()}]])])
    row, windows = store.get_windows("long")
    assert row is not None and row.status == "done"
    assert row.truncated is True and row.tokens == MAX_LENGTH and row.windows is None
    assert windows == []


def test_a_redelivered_long_task_writes_no_second_set_of_windows(
    tiny_settings: Settings, runner: HFRunner, store: ResultStore
) -> None:
    proc = FlushProcessor(runner, store, tiny_settings, "t@h")
    item = {"id": "long", "text": long_text(), "submitted_at": time.time()}
    proc.process([("m1", [[item]])])
    first, windows = store.get_windows("long")
    assert first is not None
    # redelivered (another message id): skipped, and a direct upsert cannot add windows
    again = proc.process([("m1-again", [[item]])])
    assert again.skipped == 1
    late = ResultRecord(id="long", model=first.model, status="done", text_sha256="x",
                        text_chars=1, finished_at=utcnow(), windows=1)
    extra = [WindowRecord("long", first.model, 99, 0, 1, 3, "negative", 0.6,
                          {"negative": 0.6, "positive": 0.4})]
    assert store.upsert([late], {("long", first.model): extra}) == []
    row, after = store.get_windows("long")
    assert row is not None and row.windows == first.windows and row.attempts == 1
    assert after == windows
    count = store.run(lambda c: c.execute(sa.text("SELECT count(*) FROM bertstream_windows"))
                      .scalar_one(), "count")
    assert count == len(windows)


def test_a_retried_failed_row_replaces_its_windows(store: ResultStore) -> None:
    def record(status: str) -> ResultRecord:
        return ResultRecord(id="t", model="m", status=status, text_sha256="x", text_chars=1,
                            finished_at=utcnow(), windows=2 if status == "done" else None)

    def win(n: int, score: float) -> WindowRecord:
        return WindowRecord("t", "m", n, n, n + 1, 3, "positive", score,
                            {"negative": 1 - score, "positive": score})

    # a failed row that somehow kept windows (three of them) is retried as done with two
    assert store.upsert([record("failed")], {("t", "m"): [win(0, .6), win(1, .6), win(2, .6)]}) == []
    assert store.upsert([record("done")], {("t", "m"): [win(0, .9), win(1, .8)]}) == []
    row, windows = store.get_windows("t")
    assert row is not None and row.status == "done" and row.attempts == 2
    assert [(w.window, w.score) for w in windows] == [(0, .9), (1, .8)]
    assert store.get_windows("t", model="other") == (None, [])


def _refuse_windows_of(store: ResultStore, prefix: str) -> None:
    """Make the database refuse window rows of ids starting with ``prefix``."""
    if store.engine.dialect.name == "sqlite":
        sql = (f"CREATE TRIGGER refuse_windows BEFORE INSERT ON bertstream_windows "
               f"WHEN NEW.id LIKE '{prefix}%' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    else:
        sql = (f"ALTER TABLE bertstream_windows ADD CONSTRAINT refuse_windows "
               f"CHECK (id NOT LIKE '{prefix}%')")
    with store.engine.begin() as conn:
        conn.execute(sa.text(sql))


def test_a_window_row_the_database_refuses_fails_only_its_task(
    tiny_settings: Settings, runner: HFRunner, store: ResultStore
) -> None:
    _refuse_windows_of(store, "refuse-")
    proc = FlushProcessor(runner, store, tiny_settings, "t@h")
    now = time.time()
    items = [{"id": "refuse-1", "text": long_text(), "submitted_at": now},
             {"id": "long-ok", "text": long_text(20), "submitted_at": now},
             *({"id": f"s{i}", "text": "good coffee", "submitted_at": now} for i in range(6))]
    stats = proc.process([("m1", [items])])
    assert stats.refused == 1 and stats.unwritable == set()
    refused, windows = store.get_windows("refuse-1")
    assert refused is not None and refused.status == "failed" and windows == []
    assert "database refused" in (refused.error or "")
    ok, ok_windows = store.get_windows("long-ok")
    assert ok is not None and ok.status == "done" and ok.windows == len(ok_windows) > 1
    assert all(r.status == "done" for r in store.query(limit=None) if r.id.startswith("s"))


def test_a_flush_slices_long_texts_and_holds_them_for_later_flushes(
    tiny_settings: Settings, runner: HFRunner, store: ResultStore
) -> None:
    s = tiny_settings.replace(window_slice_ms=1)
    proc = FlushProcessor(runner, store, s, "t@h", hold_windows=True)
    now = time.time()
    first = proc.process([("m-long", [[{"id": "long", "text": long_text(), "submitted_at": now}]]),
                          ("m-short", [[{"id": "short", "text": "great", "submitted_at": now}]]),
                          ("m-long2", [[{"id": "long2", "text": long_text(9),
                                         "submitted_at": now}]])])
    assert proc.held() == {"m-long", "m-long2"} and first.unwritable == set()
    assert store.get("short") is not None and store.get("long") is None
    flushes = 1
    while proc.held():
        proc.token_cost = 1.0  # as if a window took 30 s: one window per flush
        proc.process([("m-next", [[{"id": f"n{flushes}", "text": "ok", "submitted_at": now}]])])
        flushes += 1
        assert store.get(f"n{flushes - 1}") is not None  # short texts never wait for it
    row, windows = store.get_windows("long")
    assert row is not None and row.status == "done" and row.windows == len(windows)
    row2, windows2 = store.get_windows("long2")
    assert row2 is not None and row2.status == "done" and row2.windows == len(windows2)
    assert flushes == len(windows) + len(windows2)


def test_the_slice_fits_windows_to_the_measured_speed(
    tiny_settings: Settings, runner: HFRunner, store: ResultStore
) -> None:
    proc = FlushProcessor(runner, store, tiny_settings.replace(window_slice_ms=100), "t@h",
                          hold_windows=True)
    proc.token_cost = 1e-3  # 1 ms per token: ~30 ms per window
    proc.process([("m", [[{"id": "long", "text": long_text(60), "submitted_at": time.time()}]])])
    windows = proc.backlog[0].windows or []
    scored = [w for w in windows if w.outcome is not None]
    assert 0 < len(scored) < len(windows)
    assert sum(w.tokens for w in scored) * 1e-3 <= 0.1
    assert sum(w.tokens for w in windows[:len(scored) + 1]) * 1e-3 > 0.1
    assert proc.token_cost is not None and proc.token_cost != 1e-3  # learnt from the flush


@pytest.mark.slow
def test_a_worker_scores_long_texts_whole(settings: Settings, tiny_model_dir: Path,
                                          worker_factory: Any, api_factory: Any) -> None:
    """A real worker holding long texts over several flushes; the client and HTTP reads."""
    s = settings.replace(model=str(tiny_model_dir), max_length=MAX_LENGTH, window_slice_ms=5)
    texts = {f"long-{i}": long_text(20 + 7 * i) for i in range(4)}
    texts.update({f"short-{i}": "the hotel is good" for i in range(40)})
    worker_factory(s)
    with Client(s) as client:
        for task_id, text in texts.items():
            client.submit(text, id=task_id)
        rows = client.wait(list(texts), timeout=120)
        assert all(r.status == "done" for r in rows.values())
        for i in range(4):
            row = rows[f"long-{i}"]
            windows = client.windows(f"long-{i}")
            assert row.windows == len(windows) > 2 and not row.truncated
            assert [w.window for w in windows] == list(range(len(windows)))
            # the last window leaves out the text's trailing whitespace
            text = texts[f"long-{i}"]
            assert windows[0].start_char == 0 and windows[-1].end_char == len(text.rstrip())
        assert client.windows("short-0") == [] and client.windows("nope") == []
        assert client.windows("long-0", model="other-model") == []
        assert client.queue_length() == 0
    api = api_factory(s)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        body = http.get("/v1/tasks/long-1/windows").json()
        assert body["id"] == "long-1" and body["status"] == "done"
        assert body["count"] == len(body["windows"]) > 2
        first = body["windows"][0]
        assert {"window", "start_char", "end_char", "tokens", "label", "score",
                "scores"} <= set(first) and first["start_char"] == 0
        assert http.get("/v1/tasks/short-1/windows").json()["windows"] == []
        assert http.get("/v1/tasks/nope/windows").status_code == 404
        assert http.get("/v1/tasks/long-1/windows", params={"model": "x"}).status_code == 404


class _FakeRequest:
    """What the task's ack and reject paths touch of a Celery request."""

    def __init__(self) -> None:
        self.acknowledged = False
        self.rejected: bool | None = None
        self.message = None

    def acknowledge(self) -> None:
        self.acknowledged = True

    def reject(self, requeue: bool = False) -> None:
        self.rejected = requeue


def _holding_task(s: Settings, runner: HFRunner,
                  store: ResultStore) -> tuple[FlushProcessor, Any]:
    """A processor that holds long texts, and the Celery task on it (no delivery counter:
    each test gives the attempt itself)."""
    from celery import Celery

    from worker.tasks import register_tasks

    proc = FlushProcessor(runner, store, s, "t@h", hold_windows=True)
    task = register_tasks(Celery("t", broker="memory://"), proc, s)
    task.deliveries = None
    return proc, task


class _QueuedRequest(_FakeRequest):
    """A fake request as the task's flush reads it (``SimpleRequest.from_request``)."""

    def __init__(self, mid: str, items: list[dict[str, Any]]) -> None:
        super().__init__()
        self.id, self.name, self.hostname, self.reply_to, self.correlation_id = (
            mid, "t", "h", None, None)
        self._payload: tuple[Any, ...] = ((items,), {}, {})
        self.delivery_info: dict[str, Any] = {}
        self.request_dict: dict[str, Any] = {}


def _counted(task: Any) -> Any:
    """Give ``task`` an in-memory delivery counter (as on memory://); gives the counter."""
    from worker.deliveries import DeliveryCounter

    task.deliveries = DeliveryCounter(Settings(broker_url="memory://"))
    return task.deliveries


def _held_long_message(s: Settings, runner: HFRunner, store: ResultStore, mid: str,
                       *others: tuple[str, str]) -> tuple[FlushProcessor, Any, Any,
                                                          list[dict[str, Any]], _QueuedRequest]:
    """A holding task with a delivery counter (slices of one window) takes message ``mid``:
    a long text (id ``long``) and ``others`` (id, text), in a first flush. Gives the
    processor, the task, the counter, the message's items and its request."""
    proc, task = _holding_task(s.replace(window_slice_ms=1), runner, store)
    counter = _counted(task)
    now = time.time()
    items = [{"id": "long", "text": long_text(), "submitted_at": now},
             *({"id": i, "text": text, "submitted_at": now} for i, text in others)]
    request = _QueuedRequest(mid, items)
    task.flush([request])
    return proc, task, counter, items, request


def test_a_dead_lettered_message_leaves_the_held_ones_held(
    tiny_settings: Settings, runner: HFRunner, store: ResultStore
) -> None:
    """Through the task's flush (``max_attempts=1``): dead-lettering one message must not ack
    another whose long text is still in the backlog (its rows are not stored yet, so a crash
    after that ack would lose the text). A restored copy of the held message in the same
    flush is neither counted nor dead-lettered, and not acked alone (that ack would drop
    the original's record: they share a delivery tag): it joins the original, and both
    are acked once the text is stored."""
    proc, task, counter, items, held = _held_long_message(
        tiny_settings.replace(max_attempts=1), runner, store, "m-long")
    now = items[0]["submitted_at"]
    assert proc.held() == {"m-long"} and not held.acknowledged
    proc.token_cost = 1.0  # as if a window took 30 s: one window per flush from here on
    counter.incr(["m-dead"])  # delivered once before, to a worker that died in its flush
    other = _QueuedRequest("m-dead", [{"id": "dead", "text": "fine", "submitted_at": now}])
    copy = _QueuedRequest("m-long", items)
    task.flush([other, copy])
    assert other.acknowledged  # its failed row is stored
    row = store.get("dead")
    assert row is not None and row.status == "failed" and "dead-lettered" in (row.error or "")
    assert store.get("long") is None, "the copy of the held message was dead-lettered"
    assert not any(r.acknowledged or r.rejected is not None for r in (held, copy))
    assert counter._local == {"m-long": 1}
    while proc.held():
        task.flush([])
    assert held.acknowledged and copy.acknowledged and copy.rejected is None
    final = store.get("long")
    assert final is not None and final.status == "done" and final.attempts == 1
    assert counter._local == {}


def test_a_restored_copy_of_a_held_message_joins_it(
    tiny_settings: Settings, runner: HFRunner, store: ResultStore
) -> None:
    """A message held for its long text outlasts the visibility timeout: the broker restores
    a copy (delivery 2, not dead). The copy's long text is not queued a second time (the
    flush that takes the copy scores the next window of the original's), and the original
    and the copy are both acked once the text is stored (the copy used to replace the
    original, which then stayed unacked until the worker restarted)."""
    proc, task, counter, items, original = _held_long_message(
        tiny_settings.replace(max_attempts=3), runner, store, "m-long", ("short", "fine"))
    assert proc.held() == {"m-long"} and not original.acknowledged
    proc.token_cost = 1.0  # as if a window took 30 s: one window per flush from here on
    left = sum(w.outcome is None for w in proc.backlog[0].windows or ())
    copy = _QueuedRequest("m-long", items)
    task.flush([copy])
    assert [e.key for e in proc.backlog] == ["long"]  # not queued twice
    assert sum(w.outcome is None for w in proc.backlog[0].windows or ()) == left - 1
    assert not original.acknowledged and not copy.acknowledged
    assert original.rejected is None and copy.rejected is None
    assert counter._local == {"m-long": 1}  # the copy is no new delivery
    while proc.held():
        task.flush([])
    assert original.acknowledged and copy.acknowledged
    final, short = store.get("long"), store.get("short")
    assert final is not None and final.status == "done"
    assert short is not None and short.status == "done"


def test_a_dead_lettered_redelivery_of_a_message_left_in_the_backlog_is_acked(
    tiny_settings: Settings, runner: HFRunner, store: ResultStore
) -> None:
    """A message whose long text stays in the backlog while the message itself was requeued
    (another of its rows the database refuses even as a minimal row: a real trigger) is
    held by no request. Its redelivery, past ``max_attempts``, is dead-lettered and acked
    although its id is still in the backlog: nothing else would ever ack or requeue it (it
    would stay unacked until the sweep restored it, over and over). Why a dead-lettered
    delivery is acked whatever the backlog holds."""
    import hashlib

    from tests.test_poison import _refuse_rows

    _refuse_rows(store, sha=hashlib.sha256(b"refuse me").hexdigest())
    proc, task, counter, items, first = _held_long_message(
        tiny_settings.replace(max_attempts=1), runner, store, "m-mix", ("bad", "refuse me"))
    assert first.rejected is True and not first.acknowledged  # requeued, count kept
    assert proc.held() == {"m-mix"} and task._held == {}
    assert counter._local == {"m-mix": 1}
    again = _QueuedRequest("m-mix", items)
    task.flush([again])
    assert again.acknowledged and again.rejected is None  # dead-lettered, settled
    assert counter._local == {}
    row = store.get("long")
    assert row is not None and row.status == "failed" and "dead-lettered" in (row.error or "")
    while proc.held():
        task.flush([])
    final = store.get("long")  # the backlog's text, scored to its end, replaces the failure
    assert final is not None and final.status == "done"
    assert store.get("bad") is None


def test_copies_of_a_held_message_are_no_new_deliveries(
    tiny_settings: Settings, runner: HFRunner, store: ResultStore
) -> None:
    """Through the task's flush with a delivery counter: a copy of a held message, in a later
    flush or in the flush that took the original, is not counted (with ``max_attempts=1``
    it used to be dead-lettered: a failed row while the text was still being scored), is
    acked with the original, and a warm shutdown takes back one count per held message."""
    proc, task = _holding_task(tiny_settings.replace(window_slice_ms=1, max_attempts=1),
                               runner, store)
    counter = _counted(task)
    now = time.time()

    def request(mid: str, task_id: str) -> _QueuedRequest:
        return _QueuedRequest(mid, [{"id": task_id, "text": long_text(), "submitted_at": now}])

    first = request("m-1", "long-1")
    task.flush([first])
    assert proc.held() == {"m-1"} and counter._local == {"m-1": 1}
    proc.token_cost = 1.0  # as if a window took 30 s: one window per flush from here on
    later = request("m-1", "long-1")
    second, same_flush = request("m-2", "long-2"), request("m-2", "long-2")
    task.flush([later, second, same_flush])
    assert proc.held() == {"m-1", "m-2"} and counter._local == {"m-1": 1, "m-2": 1}
    assert store.get("long-1") is None and store.get("long-2") is None  # not dead-lettered
    everyone = [first, later, second, same_flush]
    assert not any(r.acknowledged or r.rejected is not None for r in everyone)
    task.hand_back_held()
    assert counter._local == {}
    task.flush([first, later, second, same_flush])  # the same, delivered again after a restart
    while proc.held():
        task.flush([])
    assert all(r.acknowledged for r in everyone)
    for task_id in ("long-1", "long-2"):
        row = store.get(task_id)
        assert row is not None and (row.status, row.attempts) == ("done", 1)
