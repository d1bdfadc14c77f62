"""The Phase-1 target: a short structured English report built from findings, and its parser.

Format (one finding per bullet, its locations after a colon; LOCATIONS and IMPRESSION summarise)::

    FINDINGS:
    - cardiomegaly
    - pleural effusion: left, costophrenic angle
    LOCATIONS: left, costophrenic angle
    IMPRESSION: cardiomegaly; pleural effusion.

A study with no findings (or only ``normal``) gets ``NORMAL_REPORT``. Names are canonical: lower-case,
single-spaced, no ``loc `` prefix, no ``: , ;`` (the format's separators). Findings keep their first
appearance order; duplicates merge. ``parse_report(format_report(f)).findings == canonical_findings(f)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from xray_train.data.records import Finding

NORMAL_FINDING = "no significant abnormality"
NORMAL_IMPRESSION = "normal chest radiograph"
NORMAL_REPORT = f"FINDINGS:\n- {NORMAL_FINDING}\nLOCATIONS: none\nIMPRESSION: {NORMAL_IMPRESSION}."

#: Finding names meaning "nothing abnormal"; they never appear next to real findings.
_NORMAL_NAMES = {"normal", NORMAL_FINDING}
_SEPARATORS = re.compile(r"[:;,\n\r\t]+")
_HEADER = re.compile(r"^\s*(FINDINGS|LOCATIONS|IMPRESSION)\s*:\s*(.*)$", re.IGNORECASE)
_BULLET = re.compile(r"^\s*[-*\u2022]\s*(.*)$")


def normalize_name(text: str) -> str:
    """Lower-case, single-spaced, separators (``: ; ,``) as spaces, no trailing full stop."""
    return " ".join(_SEPARATORS.sub(" ", str(text)).lower().split()).rstrip(". ")


def normalize_location(text: str) -> str:
    """Like ``normalize_name`` and drops PadChest's ``loc `` prefix."""
    name = normalize_name(text)
    while name.startswith("loc "):
        name = name[4:].lstrip()
    return name


def canonical_findings(findings: list[Finding]) -> list[Finding]:
    """Normalised names, first-seen order, duplicates merged (locations unioned in order).

    ``normal`` is dropped: alone it means a normal study (empty list), and next to real findings
    it only says some other structure is normal.
    """
    merged: dict[str, list[str]] = {}
    for finding in findings:
        name = normalize_name(finding.name)
        if not name or name in _NORMAL_NAMES:
            continue
        locations = merged.setdefault(name, [])
        for loc in finding.locations:
            loc = normalize_location(loc)
            if loc and loc != "none" and loc not in locations:
                locations.append(loc)
    return [Finding(name, tuple(locs)) for name, locs in merged.items()]


def format_report(findings: list[Finding]) -> str:
    """Findings -> the deterministic report text the model is trained to write."""
    canon = canonical_findings(findings)
    if not canon:
        return NORMAL_REPORT
    bullets = [f"- {f.name}: {', '.join(f.locations)}" if f.locations else f"- {f.name}" for f in canon]
    all_locations: list[str] = []
    for f in canon:
        all_locations += [loc for loc in f.locations if loc not in all_locations]
    return "\n".join(
        [
            "FINDINGS:",
            *bullets,
            f"LOCATIONS: {', '.join(all_locations) if all_locations else 'none'}",
            f"IMPRESSION: {'; '.join(f.name for f in canon)}.",
        ]
    )


@dataclass
class ParsedReport:
    """What ``parse_report`` could extract. ``findings`` is empty for a normal report."""

    findings: list[Finding] = field(default_factory=list)
    is_normal: bool = False
    #: All three sections present, in order, and consistent with each other.
    well_formed: bool = False


def _parse_bullet(text: str) -> Finding | None:
    name, _, locs = text.partition(":")
    name = normalize_name(name)
    if not name:
        return None
    return Finding(name, tuple(normalize_location(x) for x in locs.split(",") if normalize_location(x)))


def parse_report(text: str) -> ParsedReport:
    """Parse generated text; tolerant of junk, missing sections and truncation.

    Findings come from the FINDINGS bullets; when there are none, from the IMPRESSION list.
    ``well_formed`` is False whenever a section is missing, duplicated or out of order, a line
    cannot be placed, or the IMPRESSION names disagree with the bullets.
    """
    sections: list[str] = []
    bullets: list[Finding] = []
    impression: list[str] = []
    stray = False
    current = None
    for line in str(text).splitlines():
        if not line.strip():
            continue
        header = _HEADER.match(line)
        if header:
            current = header.group(1).upper()
            sections.append(current)
            rest = header.group(2).strip()
            if current == "FINDINGS" and rest:
                stray = True  # findings belong on bullet lines
                finding = _parse_bullet(rest.lstrip("-*\u2022 "))
                if finding:
                    bullets.append(finding)
            elif current == "IMPRESSION":
                impression += [normalize_name(x) for x in rest.rstrip(". ").split(";") if normalize_name(x)]
            continue
        bullet = _BULLET.match(line)
        if current == "FINDINGS" and bullet:
            finding = _parse_bullet(bullet.group(1))
            if finding:
                bullets.append(finding)
        else:
            stray = True

    raw = bullets or [Finding(name) for name in impression if name != NORMAL_IMPRESSION]
    names = {f.name for f in raw}
    findings = canonical_findings(raw)
    is_normal = not findings and (bool(names & _NORMAL_NAMES) or NORMAL_IMPRESSION in impression)
    if is_normal:
        consistent = bool(names) and impression == [NORMAL_IMPRESSION]
    else:
        consistent = bool(bullets) and impression == [f.name for f in findings]
    well_formed = sections == ["FINDINGS", "LOCATIONS", "IMPRESSION"] and not stray and consistent
    return ParsedReport(findings=findings, is_normal=is_normal, well_formed=well_formed)
