"""Routing rules (issue #19): decided on the header at study completion, each decision audited
with its rule; a study no rule takes is stored, not routed, with no job and no result, and is
purgeable like a finished one; a rule's destinations are the only ones its studies get.
Real senders (DCMTK storescu) against the listener, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from gateway.db.models import AuditEvent, Job, Study, StudyState
from gateway.deliver.deliveries import study_targets
from gateway.errors import ConfigurationError
from gateway.pipeline.routing import InstanceFacts, decide, rule_takes
from gateway.receive.retention import purgeable_study_uids
from gateway.settings import RoutingRule, Settings
from tests import dicom_files as files
from tests.conftest import RunningGateway
from tests.gateway.helpers import wait_until
from tests.peers import storescu

CHILD = InstanceFacts("CR", "CHEST", "1.2.840.10008.5.1.4.1.1.1", "PACS1", "RAD1", "Kids", 3)
ADULT_DX = InstanceFacts("DX", "", "1.2.840.10008.5.1.4.1.1.7", "PACS2", "", "", 81)


def rule(**kwargs: Any) -> RoutingRule:
    return RoutingRule.model_validate({"name": "r", **kwargs})


def test_each_condition_is_checked_without_case_and_with_globs() -> None:
    assert rule_takes(rule(match={"modality": ["cr", "DX"], "body_part": ["ch*"]}), CHILD)
    assert not rule_takes(rule(match={"body_part": ["ch*"]}), ADULT_DX)
    assert rule_takes(rule(match={"sop_class": ["*Computed Radiography*"]}), CHILD)
    assert rule_takes(rule(match={"sop_class": ["1.2.840.10008.5.1.4.1.1.7"]}), ADULT_DX)
    assert not rule_takes(rule(match={"calling_ae": ["PACS1"]}), ADULT_DX)
    assert rule_takes(rule(match={"station": ["rad?"], "institution": ["kids"]}), CHILD)
    assert rule_takes(rule(match={"age_years": "0-17"}), CHILD)
    assert not rule_takes(rule(match={"age_years": "0-17"}), ADULT_DX)
    unknown_age = InstanceFacts("CR", "CHEST", "1.2.840.10008.5.1.4.1.1.1", "", "", "", None)
    assert not rule_takes(rule(match={"age_years": "0-17"}), unknown_age)
    assert rule_takes(rule(), unknown_age)  # no condition: takes everything


def test_the_first_rule_that_one_instance_meets_decides() -> None:
    rules = [
        RoutingRule(name="skip-pacs2", match={"calling_ae": ["PACS2"]}, action="skip"),
        RoutingRule(name="children", match={"age_years": "0-17"}, destinations=["ris"]),
    ]
    skipped = decide(rules, [ADULT_DX])
    assert (skipped.rule, skipped.infer) == ("skip-pacs2", False)
    taken = decide(rules, [ADULT_DX.__class__("DX", "", "", "PACS9", "", "", 40), CHILD])
    assert (taken.rule, taken.infer, taken.destinations) == ("children", True, ["ris"])
    nobody = decide(rules[1:], [ADULT_DX])
    assert (nobody.rule, nobody.infer) == (None, False)
    assert nobody.audit_detail()["action"] == "not routed"
    everything = decide([], [])
    assert (everything.infer, everything.destinations) == (True, None)


def test_a_rule_with_an_unknown_destination_stops_the_listener(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    with pytest.raises(ConfigurationError, match="unknown destinations \\['nowhere'\\]"):
        gateway_factory(routing_rules=[{"name": "x", "destinations": ["nowhere"]}])


def test_rule_names_are_unique(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(Exception, match="duplicate names"):
        make_settings(routing_rules=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(Exception, match="age range"):
        make_settings(routing_rules=[{"name": "a", "match": {"age_years": "adults"}}])
    pacs = {"name": "ris", "ae_title": "RIS", "host": "127.0.0.1", "port": 104}
    hl7 = {"name": "ris", "host": "127.0.0.1", "port": 2575}
    with pytest.raises(Exception, match="used twice or reserved: \\['ris'\\]"):
        make_settings(pacs_destinations=[pacs], hl7_destinations=[hl7])
    with pytest.raises(Exception, match="used twice or reserved: \\['ehr'\\]"):
        make_settings(hl7_destinations=[{**hl7, "name": "ehr"}])


def test_a_study_gets_only_the_destinations_its_rule_named(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        pacs_destinations=[
            {"name": "main", "ae_title": "MAIN", "host": "127.0.0.1", "port": 104},
            {"name": "research", "ae_title": "RES", "host": "127.0.0.1", "port": 105},
        ]
    )
    everywhere = Study(study_uid="1.2.3", route_destinations=None)
    assert study_targets(settings, everywhere) == [
        ("dicom-sr", "main"),
        ("dicom-sr", "research"),
        ("fhir", "outbox"),
    ]
    research_only = Study(study_uid="1.2.3", route_destinations=json.dumps(["research"]))
    assert study_targets(settings, research_only) == [("dicom-sr", "research")]


def routed_events(gw: RunningGateway, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    with gw.sessions() as session:
        rows = session.execute(
            select(AuditEvent).where(AuditEvent.study_uid == study_uid).order_by(AuditEvent.id)
        ).scalars()
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            out.setdefault(row.kind, []).append(json.loads(row.detail or "{}"))
        return out


def test_studies_are_routed_or_not_at_completion_and_audited_with_the_rule(
    gateway_factory: Callable[..., RunningGateway], database_url: str, tmp_path: Path
) -> None:
    rules = [
        {"name": "skip-research-station", "match": {"station": ["THORA*"]}, "action": "skip"},
        {
            "name": "pediatric-chest",
            "match": {"modality": ["CR", "DX"], "body_part": ["CHEST"], "age_years": "0-17"},
            "destinations": ["outbox"],
        },
    ]
    gw = gateway_factory(database_url=database_url, routing_rules=rules)
    child = files.study_files(files.CHILD_CR, tmp_path / "child", 1)[0]
    adult_sc = files.study_files(files.CHEST_SC, tmp_path / "adult", 1)[0]  # no age rule met
    station = files.study_files(files.CHEST_CR, tmp_path / "station", 1)[0]  # THORAVISION
    uids = {
        name: str(dcmread(p).StudyInstanceUID)
        for name, p in (("child", child), ("adult", adult_sc), ("station", station))
    }
    result = storescu(gw.port, [child, adult_sc, station])
    assert result.returncode == 0, result.stderr

    def states() -> dict[str, str]:
        with gw.sessions() as session:
            rows = session.execute(select(Study.study_uid, Study.state)).all()
        by_uid = {uid: state for uid, state in rows}
        return {name: by_uid.get(uid, "") for name, uid in uids.items()}

    wait_until(lambda: "receiving" not in states().values(), 30, "all three completed")
    got = states()
    assert got["adult"] == got["station"] == StudyState.NOT_ROUTED
    assert got["child"] in (StudyState.COMPLETE, StudyState.QUEUED)

    child_events = routed_events(gw, uids["child"])
    (completed,) = child_events["study.completed"]
    assert completed["route"] == {
        "rule": "pediatric-chest",
        "action": "infer",
        "destinations": ["outbox"],
        "unreadable_headers": 0,
    }
    (station_event,) = routed_events(gw, uids["station"])["study.not_routed"]
    assert station_event["route"]["rule"] == "skip-research-station"
    assert station_event["route"]["action"] == "skip"
    adult_events = routed_events(gw, uids["adult"])
    assert adult_events["study.not_routed"][0]["route"]["rule"] is None
    assert "study.completed" not in adult_events

    with gw.sessions() as session:
        jobs = session.execute(select(Job.study_id)).scalars().all()
        by_uid = {s.study_uid: s for s in session.execute(select(Study)).scalars()}
        assert [by_uid[uids["child"]].id] == list(jobs)  # no job for the other two
        assert by_uid[uids["child"]].route_rule == "pediatric-chest"
        assert json.loads(by_uid[uids["child"]].route_destinations or "") == ["outbox"]
        # Not routed counts as finished for retention: purgeable once old enough.
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        purgeable = set(purgeable_study_uids(session, older_than=later))
    assert {uids["adult"], uids["station"]} <= purgeable
    assert uids["child"] not in purgeable


def test_without_rules_no_header_is_read_and_everything_goes_everywhere(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    gw = gateway_factory()
    image = files.study_files(files.CHEST_SC, tmp_path / "s", 1)[0]
    uid = str(dcmread(image).StudyInstanceUID)
    assert storescu(gw.port, [image]).returncode == 0
    wait_until(lambda: "study.completed" in routed_events(gw, uid), 30, "completed")
    (completed,) = routed_events(gw, uid)["study.completed"]
    assert "route" not in completed
    with gw.sessions() as session:
        study = session.execute(select(Study).where(Study.study_uid == uid)).scalar_one()
        assert (study.route_rule, study.route_destinations) == (None, None)


def test_the_documented_example_is_read_from_a_settings_file(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    example = doc.split("## Routing rules", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    config = tmp_path / "gateway.toml"
    config.write_text(example)
    monkeypatch.setenv("CXR_CONFIG_FILE", str(config))
    rules = make_settings().routing_rules
    assert [(r.name, r.action) for r in rules] == [
        ("research-station", "skip"),
        ("pediatric-chest", "infer"),
    ]
    assert rules[1].match.age_years == "0-17"
    assert rules[1].destinations == ["main-pacs", "ehr"]


def test_a_rule_that_excludes_a_modality(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    """The issue's check: DX studies get no result and an audit record saying which rule."""
    rules = [
        {"name": "no-dx", "match": {"modality": ["DX"]}, "action": "skip"},
        {"name": "everything-else"},
    ]
    gw = gateway_factory(routing_rules=rules)
    dx = files.study_files(files.CHEST_SC, tmp_path / "dx", 1)[0]
    cr = files.study_files(files.CHILD_CR, tmp_path / "cr", 1)[0]
    dx_uid, cr_uid = (str(dcmread(p).StudyInstanceUID) for p in (dx, cr))
    assert storescu(gw.port, [dx, cr]).returncode == 0
    wait_until(lambda: "study.not_routed" in routed_events(gw, dx_uid), 30, "DX decided")
    wait_until(lambda: "study.completed" in routed_events(gw, cr_uid), 30, "CR decided")
    (skipped,) = routed_events(gw, dx_uid)["study.not_routed"]
    assert (skipped["route"]["rule"], skipped["route"]["action"]) == ("no-dx", "skip")
    (taken,) = routed_events(gw, cr_uid)["study.completed"]
    assert taken["route"]["rule"] == "everything-else"
    with gw.sessions() as session:
        jobs = session.execute(select(Job.study_id)).scalars().all()
        studies = {s.study_uid: s for s in session.execute(select(Study)).scalars()}
    assert list(jobs) == [studies[cr_uid].id]
    assert studies[dx_uid].state == StudyState.NOT_ROUTED


def test_a_damaged_spool_file_holds_back_no_study(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    """A spooled file cut short (a disk fault) makes pydicom raise struct.error: its study is
    still routed, the file counted unreadable, and every other study is completed in the same
    pass; the delivery's header reading leaves the file out."""
    from gateway.db.models import Instance
    from gateway.deliver.deliveries import source_headers
    from gateway.pipeline.celery_app import make_celery
    from gateway.pipeline.coordinator import Coordinator
    from gateway.receive.spool import spool_file

    rules = [{"name": "chest", "match": {"body_part": ["CHEST"]}, "destinations": ["outbox"]}]
    gw = gateway_factory(routing_rules=rules, quiet_seconds=3600)  # its own pass never completes
    damaged = files.study_files(files.CHILD_CR, tmp_path / "damaged", 1)[0]
    healthy = files.study_files(files.CHILD_CR, tmp_path / "healthy", 1)[0]
    assert storescu(gw.port, [damaged, healthy]).returncode == 0
    uid = {name: str(dcmread(p).StudyInstanceUID) for name, p in (("d", damaged), ("h", healthy))}
    with gw.sessions() as session:
        paths = {
            study_uid: spool_file(gw.settings.spool_path, path)
            for study_uid, path in session.execute(
                select(Study.study_uid, Instance.path).join(Instance.study)
            ).all()
        }
    with open(paths[uid["d"]], "r+b") as fh:
        fh.truncate(152)
    settings = gw.settings.model_copy(update={"quiet_seconds": 0.0})
    coordinator = Coordinator(settings=settings, sessions=gw.sessions, app=make_celery(settings))
    assert len(coordinator.assemble()) == 1  # the healthy study's job
    with gw.sessions() as session:
        states = dict(session.execute(select(Study.study_uid, Study.state)).all())
    # The damaged study matches no rule on a header nobody can read: stored, not routed.
    assert states == {uid["d"]: StudyState.NOT_ROUTED, uid["h"]: StudyState.QUEUED}
    (not_routed,) = routed_events(gw, uid["d"])["study.not_routed"]
    assert not_routed["route"]["unreadable_headers"] == 1
    (completed,) = routed_events(gw, uid["h"])["study.completed"]
    assert completed["route"]["rule"] == "chest"
    headers = source_headers([paths[uid["d"]], paths[uid["h"]]])
    assert [str(h.StudyInstanceUID) for h in headers] == [uid["h"]]
