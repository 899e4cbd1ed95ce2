"""The ``cxr-gateway`` command line (see design.md, "Command-line contract")."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="cxr-gateway",
    help="AI imaging gateway for chest radiographs: DICOM in, DICOM SR and FHIR R4 out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register_model_commands() -> None:
    # train / evaluate / predict live with the model code; they import TensorFlow lazily.
    from training.cli import register

    register(app)


def main() -> None:
    _register_model_commands()
    app()
