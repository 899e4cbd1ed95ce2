"""``python -m training train|evaluate|calibrate ...``: the model commands without the gateway.

Same commands and options as ``cxr-gateway train|evaluate|calibrate``.
"""

from __future__ import annotations

import typer

from training.cli import register

app = typer.Typer(name="cxr-gateway", no_args_is_help=True, pretty_exceptions_enable=False)
register(app)

if __name__ == "__main__":
    app()
