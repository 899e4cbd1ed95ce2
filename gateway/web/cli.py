"""``cxr-gateway web`` (the console alone) and ``cxr-gateway users ...`` (console accounts).

Passwords come from a hidden prompt or, for scripts, from standard input with
``--password-stdin``; never from the command line, where they would land in shell history.
"""

from __future__ import annotations

import getpass
import sys
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # SQLAlchemy and pydantic-settings would cost every command (`send` too)
    from sqlalchemy.orm import Session, sessionmaker

    from gateway.settings import Settings


def _settings() -> Settings:
    from gateway.settings import settings_or_exit

    return settings_or_exit()


def _sessions() -> sessionmaker[Session]:
    from gateway.db.migrate import upgrade
    from gateway.db.session import make_engine, make_session_factory

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database)
    upgrade(engine, spool_root=settings.spool_path)
    return make_session_factory(engine)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _create(username: str, role: str, password_stdin: bool, *, first_admin: bool) -> None:
    from gateway.db.session import transaction
    from gateway.web.users import UserError, active_admin_exists, create_user

    sessions = _sessions()
    if first_admin:
        with sessions() as session:
            if active_admin_exists(session):
                typer.echo(
                    "an admin already exists; use `cxr-gateway users create --role admin`",
                    err=True,
                )
                raise typer.Exit(code=1)
    password = _read_password(password_stdin)
    try:
        with transaction(sessions) as session:
            create_user(
                session=session, username=username, password=password, role=role, actor=_actor()
            )
    except UserError as exc:
        typer.echo(f"cxr-gateway users: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(f"created {role} {username}")


PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="read the password from standard input")
]


def web() -> None:
    """Run only the web console and JSON API on CXR_WEB_BIND:CXR_WEB_PORT."""
    from gateway.service import configure_logging
    from gateway.web.server import run_web

    configure_logging()
    run_web(_settings())


def create_admin(
    username: Annotated[str, typer.Argument(help="user name")],
    password_stdin: PasswordStdin = False,
) -> None:
    """Create the first administrator (refused when an enabled admin exists)."""
    _create(username, "admin", password_stdin, first_admin=True)


def create(
    username: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[
        str, typer.Option(help="admin, clinician, auditor or sender (STOW-RS only)")
    ] = "clinician",
    password_stdin: PasswordStdin = False,
) -> None:
    """Create a user with a role."""
    _create(username, role, password_stdin, first_admin=False)


def list_users() -> None:
    """List users: name, role, enabled, last login."""
    from sqlalchemy import select

    from gateway.db.models import User

    with _sessions()() as session:
        for user in session.execute(select(User).order_by(User.username)).scalars():
            last = user.last_login_at.isoformat(timespec="seconds") if user.last_login_at else "-"
            state = "disabled" if user.disabled else "enabled"
            typer.echo(f"{user.username:<24} {user.role:<10} {state:<9} {last}")


def set_password(
    username: Annotated[str, typer.Argument(help="user name")],
    password_stdin: PasswordStdin = False,
) -> None:
    """Set a user's password (a reset by an administrator); the user's sessions end."""
    from gateway.db.session import transaction
    from gateway.web.users import UserError, reset_password

    sessions = _sessions()
    password = _read_password(password_stdin)
    try:
        with transaction(sessions) as session:
            found = reset_password(
                session=session, username=username, password=password, actor=_actor()
            )
    except UserError as exc:
        typer.echo(f"cxr-gateway users: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    if not found:
        typer.echo(f"no user {username!r}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"password set for {username}; their sessions have ended")


def disable(username: Annotated[str, typer.Argument(help="user name")]) -> None:
    """Disable a user and end its sessions (audited)."""
    from gateway.db.session import transaction
    from gateway.web.users import disable_user

    with transaction(_sessions()) as session:
        found = disable_user(session=session, username=username, actor=_actor())
    if not found:
        typer.echo(f"no user {username!r}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"disabled {username}")


def register(app: typer.Typer) -> None:
    """Add the web and users commands to the main CLI."""
    users = typer.Typer(
        help="Web console accounts (admin, clinician, auditor) and STOW-RS senders.",
        no_args_is_help=True,
    )
    app.add_typer(users, name="users")
    app.command()(web)
    users.command("create-admin")(create_admin)
    users.command("create")(create)
    users.command("list")(list_users)
    users.command("set-password")(set_password)
    users.command("disable")(disable)
