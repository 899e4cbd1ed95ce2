"""The short human-readable summary placed in DiagnosticReport.presentedForm and conclusion."""

from __future__ import annotations

from collections import Counter

from inference.finding import StudyFinding

BANNER = "AI-GENERATED RESULT - NOT VERIFIED BY A PHYSICIAN."


def percent(p: float) -> str:
    return f"{p * 100:.1f} %"


def received_text(finding: StudyFinding) -> str:
    """What the study held, by DICOM object type (a "no result" report names it)."""
    kinds = Counter(d.image.sop_class_name for d in finding.declined if d.image.sop_class_uid)
    count = len(finding.images) + len(finding.declined)
    listed = ", ".join(f"{n} x {name}" for name, n in sorted(kinds.items()))
    text = f"{count} image{'s' if count != 1 else ''} received" + (f" ({listed})" if listed else "")
    if finding.study.study_description.strip():
        text += f"; study description '{finding.study.study_description.strip()}'"
    return text


def conclusion_text(finding: StudyFinding) -> str:
    """One or two sentences for DiagnosticReport.conclusion."""
    if not finding.has_result:
        reasons = "; ".join(sorted({d.reason for d in finding.declined})) or "no usable image"
        return (
            f"{BANNER} No AI result: the algorithm (pneumonia on frontal chest radiographs) "
            f"was not applied. {received_text(finding)}; declined: {reasons}."
        )
    assert finding.probability is not None  # has_result
    verdict = (
        "Findings suggestive of pneumonia"
        if finding.present
        else "No radiographic evidence of pneumonia detected"
    )
    caveats = "".join(f" {c.rstrip('.')}." for c in finding.caveats)
    return (
        f"{BANNER} {verdict} (probability {percent(finding.probability)}, "
        f"operating threshold {percent(finding.model.threshold)}).{caveats}"
    )


def summary_text(finding: StudyFinding) -> str:
    """Plain-text report body (no patient identifiers: the EHR shows those itself)."""
    m = finding.model
    heading = (
        "Chest radiograph - automated pneumonia detection."
        if finding.has_result
        else "Automated pneumonia detection (frontal chest radiographs): not applied."
    )
    lines = [
        BANNER,
        heading,
        "",
        conclusion_text(finding).removeprefix(BANNER + " "),
        "",
        f"Algorithm: {m.name} version {m.version} ({m.manufacturer}); "
        f"model sha256 {m.content_hash[:16]}.",
    ]
    if finding.has_result:
        lines.append(f"Images analysed: {len(finding.images)} ({finding.rule}).")
    if finding.declined:
        lines.append(f"Images not analysed: {len(finding.declined)}:")
        lines.extend(f"  - {d.reason}" for d in finding.declined)
    if finding.version > 1:
        lines.append(f"This report (version {finding.version}) replaces an earlier version.")
    lines.append("The result must be reviewed by a qualified clinician before any clinical use.")
    return "\n".join(lines) + "\n"
