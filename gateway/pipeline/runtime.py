"""What each kind of worker process builds once at start: the inference runtime (holds the
model) and the delivery runtime (never imports TensorFlow). Built by gateway.pipeline.tasks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from gateway.db.models import Study, StudyState
from gateway.deliver.deliveries import Sender
from gateway.settings import Settings


@dataclass
class WorkerRuntime:
    """What an inference worker process builds once: settings, database sessions, and the
    stage that does the work on a claimed study (``process``: returns the study's new state;
    it holds the model)."""

    settings: Settings
    sessions: sessionmaker[Session]
    process: Callable[[WorkerRuntime, Study], StudyState]


@dataclass
class DeliveryRuntime:
    """What a delivery worker process builds once: settings, database sessions and the senders
    of results. Building it never imports TensorFlow (tests/gateway/test_delivery_worker.py)."""

    settings: Settings
    sessions: sessionmaker[Session]
    senders: dict[str, Sender]
