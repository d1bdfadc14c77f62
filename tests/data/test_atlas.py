from xray_train.data import atlas
from xray_train.data.records import Finding

from tests.conftest import REPO


def _only(boxes):
    assert len(boxes) == 1, boxes
    return boxes[0]


def test_split_on_semicolon_only_keeps_commas_in_terms():
    terms = atlas.parse_mesh("Aorta, Thoracic/tortuous;Opacity/lung/base/left/mild")
    assert [t.name for t in terms] == ["aorta, thoracic", "opacity"]
    assert terms[1].locations == ("lung", "base", "left")
    assert terms[1].other_qualifiers == ("mild",)


def test_intersection_lung_base_left_is_left_base_on_image_right():
    box = _only(atlas.boxes_from_mesh("Opacity/lung/base/left/mild"))
    assert box.label == "opacity"
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == atlas.SIDED_REGIONS["base"][1]
    # patient's left is the image's right half
    assert box.x_min >= 0.5


def test_patient_right_is_image_left():
    box = _only(atlas.boxes_from_mesh("Nodule/lung/upper lobe/right"))
    assert box.x_max <= 0.5 and box.y_max <= 0.4


def test_severity_qualifiers_are_not_locations():
    assert atlas.boxes_from_mesh("Cardiomegaly/borderline") == []
    assert atlas.boxes_from_mesh("Cardiomegaly/mild;Atherosclerosis/severe/large/small/moderate") == []
    assert atlas.findings_from_mesh("Cardiomegaly/borderline") == [Finding("cardiomegaly", ())]


def test_bilateral_gives_two_boxes_same_label():
    boxes = atlas.boxes_from_mesh("Pulmonary Atelectasis/base/bilateral")
    assert len(boxes) == 2 and {b.label for b in boxes} == {"pulmonary atelectasis"}
    assert boxes[0].x_max <= 0.5 <= boxes[1].x_min
    # a sided region without a side reads as both sides too
    assert len(atlas.boxes_from_mesh("Opacity/lung/base")) == 2


def test_lingula_implies_left_and_middle_lobe_implies_right():
    assert _only(atlas.boxes_from_mesh("Opacity/lingula")).x_min >= 0.5
    assert _only(atlas.boxes_from_mesh("Opacity/lung/middle lobe")).x_max <= 0.5


def test_most_specific_region_wins_and_term_anatomy_counts():
    box = _only(atlas.boxes_from_mesh("Costophrenic Angle/blunted/left"))
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == atlas.SIDED_REGIONS["costophrenic angle"][1]
    assert _only(atlas.boxes_from_mesh("Aorta, Thoracic/tortuous")).label == "aorta, thoracic"
    assert _only(atlas.boxes_from_mesh("Opacity/retrocardiac")).x_min >= 0.45


def test_normal_and_duplicates():
    assert atlas.boxes_from_mesh("normal") == [] and atlas.findings_from_mesh("normal") == []
    assert atlas.is_normal("normal") and not atlas.is_normal("Cardiomegaly/mild")
    assert len(atlas.boxes_from_mesh("Nodule/lung/upper lobe/left;Nodule/lung/upper lobe/left/small")) == 1
    found = atlas.findings_from_mesh("Opacity/lung/base/left;Opacity/lung/base/right")
    assert found == [Finding("opacity", ("lung", "base", "left", "right"))]


def test_every_region_is_a_valid_box():
    for name, value in atlas.REGIONS.items():
        rects = value if name in atlas.SIDED_REGIONS else (value,)
        for r in rects:
            if r is None:
                continue
            assert 0 <= r[0] < r[2] <= 1 and 0 <= r[1] < r[3] <= 1, name
    table = atlas_table_markdown()
    assert "costophrenic angle" in table and table.count("\n") == len(atlas.REGIONS) + 1


def atlas_table_markdown() -> str:
    """The region table as Markdown, as docs/recipe.md shows it."""
    fmt = lambda r: ", ".join(f"{v:.2f}" for v in r) if r else "-"  # noqa: E731
    lines = ["| region | patient's right | patient's left |", "|---|---|---|"]
    for name, (right, left) in atlas.SIDED_REGIONS.items():
        lines.append(f"| {name} | {fmt(right)} | {fmt(left)} |")
    for name, rect in atlas.MIDLINE_REGIONS.items():
        lines.append(f"| {name} (midline) | {fmt(rect)} | |")
    return "\n".join(lines)


def test_the_documented_atlas_is_the_code_s():
    doc = (REPO / "docs" / "recipe.md").read_text(encoding="utf-8").splitlines()
    for row in atlas_table_markdown().splitlines()[2:]:
        name, *coords = (cell.strip() for cell in row.strip("|").split("|"))
        name = name.removesuffix(" (midline)")
        documented = [line for line in doc if line.startswith(f"| {name}")]
        assert documented, name
        assert all(c in documented[0] for c in coords if c), (name, documented[0])
