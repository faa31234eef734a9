"""Measurement 2, the naive peer: one Celery task per text, seed-style.

What a first version usually looks like: a plain ``@app.task`` that
tokenizes ONE text, runs the model on it, and INSERTs one row in its own
transaction, on a solo worker with prefetch 1 and late acks. Same Redis,
same database, same model, same torch threads as the bertstream worker.

``python -m bench.naive --hostname NAME`` runs that worker,
configured from ``BERTSTREAM_*`` like the real one.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from typing import Any

from celery import Celery

from contract.results import ResultStore, results, utc_from_timestamp, utcnow
from contract.settings import Settings

NAIVE_TASK = "bench.naive_analyze"


def naive_queue(settings: Settings) -> str:
    """The naive peer's own queue."""
    return f"{settings.queue}.naive"


def build_naive_app(settings: Settings) -> Celery:
    """A plain Celery app with the one-text-per-message task (model loaded once here)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from worker.device import resolve_placement

    placement = resolve_placement(settings.device, settings.dtype)
    if settings.torch_threads and not placement.is_cuda:
        torch.set_num_threads(settings.torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        settings.model, dtype=placement.dtype).to(placement.device).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()
    app = Celery("bench-naive", broker=settings.broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    task_acks_late=True, worker_prefetch_multiplier=1,
                    worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)

    @app.task(name=NAIVE_TASK, acks_late=True)
    def analyze(item: dict[str, Any]) -> None:
        started = utcnow()
        enc = tokenizer(item["text"], truncation=True, return_tensors="pt").to(placement.device)
        with torch.inference_mode():
            probs = torch.softmax(model(**enc).logits.float(), dim=-1)[0].tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        with store.engine.begin() as conn:
            conn.execute(results.insert().values(
                id=item["id"], text=item["text"],
                text_sha256=hashlib.sha256(item["text"].encode()).hexdigest(),
                text_chars=len(item["text"]), model=model.name_or_path, status="done",
                label=labels[best], score=probs[best], scores=dict(zip(labels, probs, strict=True)),
                tokens=int(enc["input_ids"].shape[1]), batch_size=1, attempts=1, truncated=False,
                submitted_at=utc_from_timestamp(item["submitted_at"]), started_at=started,
                finished_at=utcnow(),
            ))

    return app


def publish_naive(settings: Settings, items: list[dict[str, Any]]) -> float:
    """Publish one message per item on the naive queue; give the seconds it took."""
    app = Celery("bench-naive-producer", broker=settings.broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    queue = naive_queue(settings)
    t0 = time.perf_counter()
    try:
        with app.producer_or_acquire() as producer:
            for item in items:
                app.send_task(NAIVE_TASK, args=[item], queue=queue, producer=producer,
                              ignore_result=True)
    finally:
        app.close()
    return time.perf_counter() - t0


def main() -> None:
    """Run the naive worker (solo pool, prefetch 1) until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.naive")
    parser.add_argument("--hostname", required=True)
    args = parser.parse_args()
    settings = Settings.from_env()
    app = build_naive_app(settings)
    worker: Any = app.Worker(pool="solo", concurrency=1, queues=[naive_queue(settings)],
                             hostname=args.hostname, loglevel="WARNING", without_gossip=True,
                             without_mingle=True, without_heartbeat=True)
    worker.start()


if __name__ == "__main__":
    main()
