"""Receive: the DICOM listener, the checks on each instance, the durable spool and its retention
(docs/architecture.md, "Receive")."""
