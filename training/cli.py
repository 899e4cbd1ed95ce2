"""Model commands of the ``cxr-gateway`` CLI: train, evaluate, predict (placeholder until written)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the model commands to the gateway's CLI app."""
    del app
