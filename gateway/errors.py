"""The gateway's exceptions: one base class, a few meaningful kinds.

Errors carry the study / instance UID they concern (UIDs are not PHI), never patient data.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""

    def __init__(
        self, message: str = "", *, study_uid: str = "", sop_instance_uid: str = ""
    ) -> None:
        super().__init__(message)
        self.study_uid = study_uid
        self.sop_instance_uid = sop_instance_uid


class ConfigurationError(GatewayError):
    """Settings are missing or invalid; the process cannot start."""


class IngestError(GatewayError):
    """A received instance cannot be accepted; ``status`` is the DICOM status to answer."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        reason: str,
        study_uid: str = "",
        sop_instance_uid: str = "",
    ) -> None:
        super().__init__(message, study_uid=study_uid, sop_instance_uid=sop_instance_uid)
        self.status = status
        self.reason = reason  # short machine-readable reason for the audit log


class QueueError(GatewayError):
    """The broker could not take a task (it will be re-queued by the reconciler)."""
