"""The ``cxr-gateway`` command line (see docs/architecture.md, "Processes")."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gateway.errors import ConfigurationError

if TYPE_CHECKING:  # pydantic-settings costs `send` with --port and --aet 0.2 s to import
    from gateway.settings import Settings

app = typer.Typer(
    name="cxr-gateway",
    help="AI imaging gateway for chest radiographs: DICOM in, DICOM SR and FHIR R4 out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log: list, export, verify.", no_args_is_help=True)
deliveries_app = typer.Typer(
    help="Result deliveries (SR to PACS, FHIR to EHR).", no_args_is_help=True
)
jobs_app = typer.Typer(help="Inference jobs (one per study version).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(deliveries_app, name="deliveries")
app.add_typer(jobs_app, name="jobs")
app.add_typer(audit_app, name="audit")


def _settings() -> Settings:
    from gateway.settings import settings_or_exit

    return settings_or_exit()


@app.command()
def serve() -> None:
    """Run the whole gateway (DICOM listener and study assembly here; web console and workers
    as supervised child processes) with the settings from CXR_* variables; with none set,
    embedded defaults (SQLite, a queue needing no server)."""
    from gateway.service import configure_logging
    from gateway.service import serve as run

    configure_logging()
    try:
        run(_settings())
    except ConfigurationError as exc:
        typer.echo(f"cxr-gateway serve: {exc}", err=True)
        raise typer.Exit(code=2) from exc


@app.command()
def listen() -> None:
    """Run only the DICOM listener with study assembly and the reconciler (production)."""
    from gateway.service import configure_logging, run_listener

    configure_logging()
    try:
        run_listener(_settings())
    except ConfigurationError as exc:
        typer.echo(f"cxr-gateway listen: {exc}", err=True)
        raise typer.Exit(code=2) from exc


@app.command()
def worker(
    queues: Annotated[
        str,
        typer.Option(
            help="comma-separated: 'studies' (inference, loads the model), 'delivery' (sends "
            "results, never loads TensorFlow), or both (the default)"
        ),
    ] = "studies,delivery",
    concurrency: Annotated[
        int | None,
        typer.Option(help="pool processes or threads (default: 4 for delivery only, else 1)"),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="Celery pool: prefork, solo or threads (default: threads for "
            "delivery only, else prefork)"
        ),
    ] = None,
) -> None:
    """Run a Celery worker: inference of completed studies, delivery of results, or both."""
    from gateway.service import configure_logging, run_worker

    names = [q.strip() for q in queues.split(",") if q.strip()]
    delivery_only = names == ["delivery"]
    configure_logging()
    try:
        run_worker(
            _settings(),
            concurrency=concurrency or (4 if delivery_only else 1),
            pool=pool or ("threads" if delivery_only else "prefork"),
            queues=names,
        )
    except ConfigurationError as exc:
        typer.echo(f"cxr-gateway worker: {exc}", err=True)
        raise typer.Exit(code=2) from exc


def _dicom_files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for candidate in candidates:
            with open(candidate, "rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                found.append(candidate)
    return found


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders", exists=True)],
    host: Annotated[str, typer.Option(help="receiver host")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="receiver port [CXR_DICOM_PORT]")] = None,
    aet: Annotated[str | None, typer.Option(help="receiver AE title [CXR_AE_TITLE]")] = None,
    calling_aet: Annotated[str, typer.Option(help="our AE title")] = "CXRSEND",
    batch: Annotated[int, typer.Option(min=1, max=500, help="instances per association")] = 50,
) -> None:
    """Send DICOM files (C-STORE) to a receiver, by default this gateway. Exit 1 if any failed."""
    from gateway.deliver.dicom_store import (
        Destination,
        DicomSendError,
        StoreFailedError,
        StoreResult,
    )
    from gateway.deliver.dicom_store import send as store

    settings = _settings() if port is None or aet is None else None
    destination = Destination(
        ae_title=aet or (settings.ae_title if settings else "CXRGW"),
        host=host,
        port=port if port is not None else (settings.dicom_port if settings else 11112),
        calling_ae_title=calling_aet,
    )
    files = _dicom_files(paths)
    if not files:
        typer.echo("cxr-gateway send: no DICOM files found", err=True)
        raise typer.Exit(code=2)
    failed = 0
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        try:
            results: list[StoreResult] = store(destination, chunk)
        except StoreFailedError as exc:
            results = list(exc.results)
        except DicomSendError as exc:
            typer.echo(f"FAILED {len(chunk)} file(s): {exc}", err=True)
            failed += len(chunk)
            continue
        for path, result in zip(chunk, results, strict=True):
            status = "?" if result.status is None else f"0x{result.status:04X}"
            typer.echo(f"{'ok' if result.ok else 'FAILED':<6} {status} {path}")
            failed += 0 if result.ok else 1
    typer.echo(f"sent {len(files) - failed} of {len(files)} to {destination}")
    if failed:
        raise typer.Exit(code=1)


@app.command()
def check(
    database: Annotated[bool, typer.Option(help="the database answers and has the schema")] = True,
    broker: Annotated[bool, typer.Option(help="the broker accepts a connection")] = True,
    model: Annotated[bool, typer.Option(help="the model artifact loads")] = False,
    dicom: Annotated[bool, typer.Option(help="the local listener answers C-ECHO")] = False,
    dicom_host: Annotated[str, typer.Option(help="listener host for --dicom")] = "127.0.0.1",
    storage: Annotated[
        bool,
        typer.Option(help="spool, heat maps and outbox are writable here; lists the other hosts"),
    ] = False,
) -> None:
    """Readiness checks for container health checks and operators; exit 1 if any fails."""
    from gateway.monitor import health

    settings = _settings()
    results = []
    if storage:
        from gateway.receive.storage_probe import check_storage

        results.extend(check_storage(settings))
    if database:
        results.append(health.check_database(settings))
    if broker:
        results.append(health.check_broker(settings))
    if model:
        results.append(health.check_model(settings))
    if dicom:
        results.append(
            health.dicom_echo(dicom_host, settings.dicom_port, settings.ae_title, settings.ae_title)
        )
    for r in results:
        typer.echo(f"{'ok' if r.ok else 'FAILED':<6} {r.name:<9} {r.detail}")
    if not all(r.ok for r in results):
        raise typer.Exit(code=1)


@app.command("purge-spool")
def purge_spool_command(
    older_than_days: Annotated[float, typer.Option(min=0, help="age of the study's last image")],
    dry_run: Annotated[bool, typer.Option(help="only count what would be deleted")] = False,
    include_failed: Annotated[
        bool,
        typer.Option(
            help="also studies with a failed or held delivery (it can then never be retried)"
        ),
    ] = False,
) -> None:
    """Delete spooled images of finished, fully delivered studies older than N days (audited).
    A failed or held delivery keeps its study's images until it is retried and delivered."""
    import getpass

    from gateway.db.session import make_engine, make_session_factory
    from gateway.receive.retention import purge_spool

    settings = _settings()
    sessions = make_session_factory(make_engine(settings.database))
    result = purge_spool(
        sessions,
        older_than_days=older_than_days,
        actor=f"cli:{getpass.getuser()}",
        spool_root=settings.spool_path,
        dry_run=dry_run,
        include_failed=include_failed,
    )
    verb = "would delete" if dry_run else "deleted"
    typer.echo(
        f"{verb} {result.files} files ({result.bytes / 1e6:.1f} MB) of {result.studies} studies"
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations (safe to repeat)."""
    from gateway.db.migrate import current_revision, upgrade
    from gateway.db.session import make_engine

    settings = _settings()
    engine = make_engine(settings.database)
    upgrade(engine, spool_root=settings.spool_path)
    typer.echo(f"database at revision {current_revision(engine)}")


def _parse_time(value: str | None, option: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 time", param_hint=option) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@audit_app.command("list")
def audit_list(
    since: Annotated[str | None, typer.Option(help="ISO time, e.g. 2026-11-27T08:00")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time (exclusive)")] = None,
    kind: Annotated[str | None, typer.Option(help="event kind, or a prefix ending in '.'")] = None,
    outcome: Annotated[str | None, typer.Option(help="success, warning or failure")] = None,
    study: Annotated[str | None, typer.Option(help="Study Instance UID")] = None,
    actor: Annotated[str | None, typer.Option(help="AE title, user or process")] = None,
    peer: Annotated[str | None, typer.Option(help="peer IP address")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """List audit events, most recent first."""
    from gateway.audit import AuditFilter, event_as_dict, list_events
    from gateway.db.session import make_engine, make_session_factory

    flt = AuditFilter(
        since=_parse_time(since, "--since"),
        until=_parse_time(until, "--until"),
        kind=kind,
        outcome=outcome,
        study_uid=study,
        actor=actor,
        peer_address=peer,
    )
    sessions = make_session_factory(make_engine(_settings().database))
    with sessions() as session:
        events = [event_as_dict(e) for e in list_events(session, flt, limit=limit)]
    for e in events:
        if as_json:
            typer.echo(json.dumps(e, sort_keys=True))
        else:
            detail = json.dumps(e["detail"], sort_keys=True) if e["detail"] else ""
            typer.echo(
                f"{e['id']:>7} {e['occurred_at'][:23]} {e['kind']:<24} {e['outcome']:<8} "
                f"{e['actor'] or '-':<16} {e['peer_address'] or '-':<15} "
                f"{e['study_uid'] or '-'} {detail}"
            )


@audit_app.command("verify")
def audit_verify(
    checkpoint: Annotated[
        bool, typer.Option("--checkpoint", help="when intact, append a checkpoint of the head")
    ] = False,
) -> None:
    """Check the audit log: the hash chain, then the keyed checkpoints in
    CXR_AUDIT_CHECKPOINT_FILE (truncated, rewritten and recomputed, checkpoint file tampered).
    Exit 1 naming the problem."""
    from gateway.audit_checkpoint import CheckpointError, CheckpointLog, verify_audit
    from gateway.db.session import make_engine, make_session_factory

    settings = _settings()
    checkpoints = CheckpointLog.from_settings(settings)
    sessions = make_session_factory(make_engine(settings.database))
    with sessions() as session:
        result = verify_audit(session, checkpoints)
    if not result.intact:
        typer.echo(result.summary(), err=True)
        raise typer.Exit(code=1)
    typer.echo(result.summary())
    if checkpoint:
        try:
            point = checkpoints.write(sessions, only_if_moved=False)
        except (CheckpointError, OSError) as exc:
            typer.echo(f"audit checkpoint not written: {exc}", err=True)
            raise typer.Exit(code=1) from exc
        assert point is not None  # only_if_moved=False always writes
        typer.echo(f"checkpoint written: event {point.last_id} to {checkpoints.path}")


@deliveries_app.command("list")
def deliveries_list(
    state: Annotated[
        str | None,
        typer.Option(help="pending, retrying, sending, delivered, failed, held, skipped"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List deliveries, newest first."""
    from sqlalchemy import select

    from gateway.db.models import Delivery, Study
    from gateway.db.session import make_engine, make_session_factory

    sessions = make_session_factory(make_engine(_settings().database))
    query = (
        select(Delivery, Study.study_uid, Study.version)
        .join(Study, Study.id == Delivery.study_id)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(Delivery.state == state)
    with sessions() as session:
        for d, study_uid, version in session.execute(query).all():
            row = {
                "id": d.id,
                "study_uid": study_uid,
                "version": version,
                "kind": d.kind,
                "destination": d.destination,
                "state": d.state,
                "attempts": d.attempts,
                "next_attempt_at": d.next_attempt_at.isoformat() if d.next_attempt_at else None,
                "last_error": d.last_error,
            }
            if as_json:
                typer.echo(json.dumps(row, sort_keys=True))
            else:
                typer.echo(
                    f"{d.id:>6} {d.kind:<9} {d.destination:<12} {d.state:<10} {d.attempts:>3} "
                    f"{study_uid} v{version} {d.last_error[:80]}"
                )


@deliveries_app.command("retry")
def deliveries_retry(delivery_id: Annotated[int, typer.Argument(help="delivery id")]) -> None:
    """Ask for another attempt of a failed or held delivery (audited); a worker sends it."""
    import getpass

    from gateway.db.models import Delivery, DeliveryState
    from gateway.db.session import make_engine, make_session_factory, transaction
    from gateway.deliver.deliveries import retry_delivery

    sessions = make_session_factory(make_engine(_settings().database))
    with transaction(sessions) as session:
        outcome = retry_delivery(
            session=session, delivery_id=delivery_id, actor=f"cli:{getpass.getuser()}"
        )
        delivery = session.get(Delivery, delivery_id)
        error = delivery.last_error if delivery else ""
    if outcome == DeliveryState.SKIPPED:  # a later version went to the same destination
        typer.echo(f"delivery {delivery_id} not retried: {error}; marked skipped", err=True)
        raise typer.Exit(code=1)
    if not outcome:
        typer.echo(f"delivery {delivery_id} not found or not failed/held", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"delivery {delivery_id} will be retried at the next reconciliation")


@jobs_app.command("list")
def jobs_list(
    state: Annotated[
        str | None,
        typer.Option(help="pending, queued, running, done, failed, superseded"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List inference jobs, newest first."""
    from sqlalchemy import select

    from gateway.db.models import Job, Study
    from gateway.db.session import make_engine, make_session_factory

    sessions = make_session_factory(make_engine(_settings().database))
    query = (
        select(Job, Study.study_uid, Study.version, Study.state)
        .join(Study, Study.id == Job.study_id)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(Job.state == state)
    with sessions() as session:
        for j, study_uid, version, study_state in session.execute(query).all():
            row = {
                "id": j.id,
                "study_uid": study_uid,
                "version": version,
                "study_state": study_state,
                "state": j.state,
                "attempts": j.attempts,
                "finished_at": j.finished_at.isoformat() if j.finished_at else None,
                "last_error": j.last_error,
            }
            if as_json:
                typer.echo(json.dumps(row, sort_keys=True))
            else:
                error = j.last_error.replace("\n", " ")[:80]
                typer.echo(
                    f"{j.id:>6} {j.state:<10} {j.attempts:>3} {study_uid} v{version} {error}"
                )


@jobs_app.command("retry")
def jobs_retry(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID")],
    version: Annotated[
        int | None, typer.Option(min=1, help="study version (default: the latest)")
    ] = None,
) -> None:
    """Process a failed study version again, with a fresh attempt budget (audited); exit 1
    when it is not failed (or not the study's latest version)."""
    import getpass

    from gateway.db.session import make_engine, make_session_factory, transaction
    from gateway.pipeline.celery_app import make_celery, publish_job
    from gateway.pipeline.tasks import RetryRefused, retry_failed_job

    settings = _settings()
    sessions = make_session_factory(make_engine(settings.database))
    try:
        with transaction(sessions) as session:
            retried = retry_failed_job(
                session=session,
                study_uid=study_uid,
                version=version,
                actor=f"cli:{getpass.getuser()}",
            )
    except RetryRefused as exc:
        typer.echo(f"jobs retry: study {study_uid}: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    what = f"study {study_uid} version {retried.version} (job {retried.job_id})"
    if publish_job(
        app=make_celery(settings), sessions=sessions, job_id=retried.job_id, reason="retry"
    ):
        typer.echo(f"{what} queued for processing again")
    else:
        typer.echo(f"{what} will be queued at the next reconciliation (broker unreachable)")


@app.command()
def predict(
    files: Annotated[list[Path], typer.Argument(help="DICOM, PNG or JPEG files")],
    model: Annotated[
        Path | None,
        typer.Option(help="Model artifact folder (default: $CXR_MODEL_DIR, else the shipped one)"),
    ] = None,
    heatmap_dir: Annotated[
        Path | None, typer.Option(help="Write <file>.heatmap.png overlays here")
    ] = None,
    age: Annotated[
        str | None,
        typer.Option(help="The patient's age: years (3), or with a unit (18M, 40W, 200D)"),
    ] = None,
) -> None:
    """Print one JSON object per input file (probability, decision, input check). Outside
    the model's intended ages (--age, or a DICOM header's age) the answer is "no result"."""
    _quiet_tensorflow()
    from inference.file_prediction import predict_file
    from inference.population import stated_age
    from inference.predictor import Predictor

    try:
        stated = stated_age(age, "--age") if age is not None else None
    except ValueError as exc:
        typer.echo(f"predict: {exc}", err=True)
        raise typer.Exit(2) from exc
    predictor = Predictor.load(model)
    failed = False
    for path in files:
        result, png = predict_file(predictor, path, heatmap=heatmap_dir is not None, age=stated)
        if png is not None and heatmap_dir is not None:
            heatmap_dir.mkdir(parents=True, exist_ok=True)
            (heatmap_dir / f"{path.name}.heatmap.png").write_bytes(png)
        failed = failed or "error" in result
        typer.echo(json.dumps(result))
    if failed:
        raise typer.Exit(1)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@functools.cache
def build_app() -> typer.Typer:
    """The whole command line: the commands here, the model commands (train, evaluate,
    calibrate: training/, which import TensorFlow and the training extra lazily) and the
    console's (web, users: FastAPI and uvicorn imported lazily). Registered once (cached)."""
    from gateway.web.cli import register as register_web
    from training.cli import register as register_model

    register_model(app)
    register_web(app)
    return app


# Modules that pydicom imports at start-up and that sending never uses: numpy, Pillow and
# pylibjpeg (pixel data, which `send` never decodes) and requests (pydicom's downloads of its
# test files). Marked missing in a `send` process, pydicom takes its paths for their absence:
# 0.18 s less start-up (issue #20; figures in benchmarks/README.md).
NOT_IMPORTED_BY_SEND = ("numpy", "PIL", "pylibjpeg", "requests")


def main() -> None:
    if sys.argv[1:2] == ["send"]:
        for name in NOT_IMPORTED_BY_SEND:
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    build_app()()


if __name__ == "__main__":
    main()
