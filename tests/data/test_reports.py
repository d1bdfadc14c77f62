from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from xray_train.data.records import Finding
from xray_train.data.reports import (
    NORMAL_REPORT,
    ParsedReport,
    canonical_findings,
    format_report,
    parse_report,
)

EXAMPLE = [
    Finding("cardiomegaly"),
    Finding("pleural effusion", ("loc left", "loc costophrenic angle")),
]
EXAMPLE_TEXT = (
    "FINDINGS:\n"
    "- cardiomegaly\n"
    "- pleural effusion: left, costophrenic angle\n"
    "LOCATIONS: left, costophrenic angle\n"
    "IMPRESSION: cardiomegaly; pleural effusion."
)


def test_format_matches_the_documented_layout():
    assert format_report(EXAMPLE) == EXAMPLE_TEXT


def test_normal_report_for_no_findings_or_only_normal():
    assert format_report([]) == NORMAL_REPORT
    assert format_report([Finding("normal"), Finding(" Normal ")]) == NORMAL_REPORT
    assert "no significant abnormality" in NORMAL_REPORT and "LOCATIONS: none" in NORMAL_REPORT


def test_normal_next_to_findings_is_dropped():
    assert format_report([Finding("normal"), Finding("cardiomegaly")]) == format_report([Finding("cardiomegaly")])


def test_duplicates_merge_in_first_seen_order():
    findings = [
        Finding("Nodule", ("loc right",)),
        Finding("scoliosis"),
        Finding(" nodule", ("right", "loc apical")),
    ]
    assert canonical_findings(findings) == [Finding("nodule", ("right", "apical")), Finding("scoliosis")]
    text = format_report(findings)
    assert "- nodule: right, apical\n- scoliosis\nLOCATIONS: right, apical\n" in text


def test_separators_inside_names_cannot_break_the_format():
    text = format_report([Finding("a: b; c, d", ("x, y",))])
    assert parse_report(text).findings == [Finding("a b c d", ("x y",))]


def test_parse_example():
    parsed = parse_report(EXAMPLE_TEXT)
    assert parsed == ParsedReport(
        findings=[Finding("cardiomegaly"), Finding("pleural effusion", ("left", "costophrenic angle"))],
        is_normal=False,
        well_formed=True,
    )


def test_parse_normal_report():
    assert parse_report(NORMAL_REPORT) == ParsedReport(findings=[], is_normal=True, well_formed=True)


def test_parse_is_case_and_whitespace_insensitive():
    text = "findings:\n  *  Cardiomegaly :  LEFT\n\nLocations: left\nImpression:  CARDIOMEGALY ."
    parsed = parse_report(text)
    assert parsed.findings == [Finding("cardiomegaly", ("left",))]
    assert parsed.well_formed


def test_missing_sections_are_not_well_formed_but_still_parsed():
    parsed = parse_report("FINDINGS:\n- cardiomegaly\n- pleural eff")  # truncated generation
    assert not parsed.well_formed
    assert [f.name for f in parsed.findings] == ["cardiomegaly", "pleural eff"]


def test_impression_is_a_fallback_when_bullets_are_missing():
    parsed = parse_report("IMPRESSION: cardiomegaly; nodule.")
    assert [f.name for f in parsed.findings] == ["cardiomegaly", "nodule"]
    assert not parsed.well_formed and not parsed.is_normal


def test_normal_impression_alone_is_normal():
    parsed = parse_report("IMPRESSION: normal chest radiograph.")
    assert parsed.is_normal and parsed.findings == [] and not parsed.well_formed


def test_inconsistent_impression_is_not_well_formed():
    text = EXAMPLE_TEXT.replace("IMPRESSION: cardiomegaly; pleural effusion.", "IMPRESSION: pneumonia.")
    parsed = parse_report(text)
    assert not parsed.well_formed
    assert [f.name for f in parsed.findings] == ["cardiomegaly", "pleural effusion"]


def test_junk_is_tolerated():
    for junk in ["", "   ", "<loc0001> ; ;", "FINDINGS:", "- a\n- b", "IMPRESSION:", "\x00\ufffd"]:
        parsed = parse_report(junk)
        assert isinstance(parsed, ParsedReport) and not parsed.well_formed
    assert parse_report("chatter\n" + EXAMPLE_TEXT).well_formed is False
    assert parse_report("chatter\n" + EXAMPLE_TEXT).findings == parse_report(EXAMPLE_TEXT).findings


def test_repeated_sections_are_not_well_formed():
    assert not parse_report(EXAMPLE_TEXT + "\n" + EXAMPLE_TEXT).well_formed


# Realistic names: PadChest label / location vocabulary plus arbitrary lower-case words.
_WORDS = st.sampled_from(
    [
        "pleural", "effusion", "copd", "signs", "nsg", "tube", "cardiomegaly", "right", "upper", "lobe",
        "costophrenic", "angle", "loc", "basal", "bilateral", "double", "j", "stent", "chilaiditi", "sign",
        "normal", "catheter", "via", "jugular", "vein", "no", "none", "unchanged",
    ]
)  # fmt: skip
_NAME = st.one_of(
    st.lists(_WORDS, min_size=1, max_size=5).map(" ".join),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC -:;,.", min_size=1, max_size=25),
)
_FINDING = st.builds(Finding, _NAME, st.lists(_NAME, max_size=4).map(tuple))


@given(st.lists(_FINDING, max_size=8))
@settings(max_examples=300, deadline=None)
def test_round_trip(findings):
    canon = canonical_findings(findings)
    text = format_report(findings)
    parsed = parse_report(text)
    assert parsed.findings == canon
    assert parsed.is_normal == (not canon)
    assert parsed.well_formed
    # Canonical form is a fixed point, and formatting is deterministic.
    assert canonical_findings(canon) == canon
    assert format_report(canon) == text
