"""Deliveries are published on their own queue (cxr-deliveries), one task per destination, and
the database decides what is published again when a message is lost (issue #21)."""

from __future__ import annotations

import datetime as dt
import queue
from collections.abc import Callable

import pytest

from gateway.db.migrate import upgrade
from gateway.db.models import Delivery, Study, utcnow
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.deliver.deliveries import FHIR, OUTBOX, SR, due_deliveries
from gateway.pipeline.celery_app import (
    DELIVERY_QUEUE_NAME,
    QUEUE_NAME,
    TASK_DELIVER,
    make_celery,
    publish_deliveries,
)
from gateway.settings import Settings


def test_each_destination_is_one_task_on_the_delivery_queue_and_a_lost_one_comes_back(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    engine = make_engine(settings.database)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        study = Study(study_uid="1.2.826.0.1.3680043.8.498.1", version=1, state="reported")
        session.add(study)
        session.flush()
        rows = [
            Delivery(study_id=study.id, kind=kind, destination=OUTBOX, state="pending",
                     attempts=0, next_attempt_at=utcnow())
            for kind in (SR, FHIR)
        ]  # fmt: skip
        session.add_all(rows)
        session.flush()
        study_id, ids = study.id, sorted(r.id for r in rows)
    app = make_celery(settings)

    assert (
        publish_deliveries(
            app=app,
            sessions=sessions,
            study_id=study_id,
            republish_after=settings.requeue_after_seconds,
        )
        == 2
    )

    with app.connection_for_write() as conn:
        deliveries = conn.SimpleQueue(DELIVERY_QUEUE_NAME)
        messages = [deliveries.get(timeout=5) for _ in ids]
        assert {m.headers["task"] for m in messages} == {TASK_DELIVER}
        assert sorted(m.payload[0][0] for m in messages) == ids  # (args, kwargs, embed)
        deliveries.close()
        studies = conn.SimpleQueue(QUEUE_NAME)
        with pytest.raises(queue.Empty):  # the inference workers never see a delivery
            studies.get(timeout=1)
        studies.close()
    # The messages are lost (say, a broker restarted without persistence): the reconciler
    # publishes the deliveries again once they are due, and not while their messages may wait.
    with sessions() as session:
        assert due_deliveries(session, now=utcnow()) == []
        later = utcnow() + dt.timedelta(seconds=settings.requeue_after_seconds + 1)
        assert sorted(due_deliveries(session, now=later)) == ids
