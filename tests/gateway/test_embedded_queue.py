"""The embedded queue (kombu's SQLAlchemy transport on SQLite) does not grow without bound."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable

from gateway.pipeline.celery_app import (
    QUEUE_NAME,
    embedded_queue_engine,
    make_celery,
    prune_embedded_queue,
)
from gateway.settings import Settings


def test_delivered_messages_are_pruned_and_pending_ones_kept(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    assert settings.broker_is_embedded
    app = make_celery(settings)
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue(QUEUE_NAME)
        for n in range(3):
            queue.put({"job_id": n})
        for _ in range(2):
            message = queue.get(timeout=5)
            message.ack()
        queue.close()
    database = settings.data_dir / "queue.sqlite3"

    def rows() -> list[tuple[int, str]]:
        db = sqlite3.connect(database)
        try:
            return list(db.execute("SELECT visible, payload FROM kombu_message ORDER BY id"))
        finally:
            db.close()

    assert [visible for visible, _ in rows()] == [0, 0, 1]
    engine = embedded_queue_engine(settings)
    assert engine is not None
    assert prune_embedded_queue(engine, older_than=dt.timedelta(hours=1)) == 0  # too recent
    assert prune_embedded_queue(engine, older_than=dt.timedelta(0)) == 2
    assert [visible for visible, _ in rows()] == [1]
    # The message left is the one not yet delivered, and it still is delivered normally.
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue(QUEUE_NAME)
        assert queue.get(timeout=5).payload == {"job_id": 2}
        queue.close()


def test_nothing_to_prune_with_an_external_broker_or_before_any_message(
    make_settings: Callable[..., Settings],
) -> None:
    assert embedded_queue_engine(make_settings(broker_url="redis://127.0.0.1:1/0")) is None
    settings = make_settings()
    settings.data_dir.mkdir(parents=True)
    engine = embedded_queue_engine(settings)
    assert engine is not None
    assert prune_embedded_queue(engine, older_than=dt.timedelta(0)) == 0  # no table yet
    assert (settings.data_dir / "queue.sqlite3").exists()  # it did look
