import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xray_train.data.loc import NO_BOX_ANSWER, decode_boxes, encode_box, encode_boxes, from_bin, to_bin
from xray_train.data.records import Box

unit = st.floats(0.0, 1.0, allow_nan=False)


@given(unit, unit, unit, unit)
def test_round_trip_within_half_a_bin(a, b, c, d):
    box = Box("nodule", min(a, c), min(b, d), max(a, c), max(b, d))
    (out,) = decode_boxes(encode_box(box))
    assert out.label == "nodule"
    for got, want in zip((out.x_min, out.y_min, out.x_max, out.y_max), (box.x_min, box.y_min, box.x_max, box.y_max)):
        assert abs(got - want) <= 1 / 1023 / 2 + 1e-12


def test_order_is_y_before_x():
    assert encode_box(Box("m", 0.0, 1.0, 1.0, 1.0)) == "<loc1023><loc0000><loc1023><loc1023> m"


@given(st.floats(-10, 10, allow_nan=False))
def test_bins_are_clipped(v):
    assert 0 <= to_bin(v) <= 1023
    assert to_bin(v) == (0 if v <= 0 else 1023 if v >= 1 else to_bin(v))


def test_loc1024_is_clipped_and_nan_rejected():
    assert from_bin(1024) == 1.0 and from_bin(-3) == 0.0
    (b,) = decode_boxes("<loc1024><loc0000><loc1024><loc1024> x")
    assert b.y_min == 1.0 and b.x_max == 1.0
    with pytest.raises(ValueError):
        to_bin(math.nan)
    with pytest.raises(ValueError):
        encode_box(Box("x", math.nan, 0, 1, 1))


def test_swapped_corners_are_reordered():
    (b,) = decode_boxes("<loc0900><loc0800><loc0100><loc0200> mass")
    assert (b.x_min, b.y_min, b.x_max, b.y_max) == (200 / 1023, 100 / 1023, 800 / 1023, 900 / 1023)


def test_no_boxes_answer_and_several_boxes():
    assert encode_boxes([]) == NO_BOX_ANSWER
    assert decode_boxes(NO_BOX_ANSWER) == []
    boxes = [Box("a", 0.1, 0.1, 0.2, 0.2), Box("pleural effusion", 0.5, 0.6, 0.9, 0.8)]
    text = encode_boxes(boxes)
    assert text.count(" ; ") == 1
    assert [b.label for b in decode_boxes(text)] == ["a", "pleural effusion"]
    assert [b.label for b in decode_boxes("junk " + text + " <loc0001> trailing")] == ["a", "pleural effusion"]


@given(*[st.floats(0, 1)] * 4)
def test_text_format_round_trips_within_half_a_step(a, b, c, d):
    box = Box("mass", min(a, b), min(c, d), max(a, b), max(c, d))
    text = encode_box(box, "text")
    assert "<loc" not in text
    (back,) = decode_boxes(text)
    for x, y in zip((box.x_min, box.y_min, box.x_max, box.y_max), (back.x_min, back.y_min, back.x_max, back.y_max)):
        assert abs(x - y) <= 0.5 / 999 + 1e-12
    assert back.label == "mass"


def test_text_format_is_plain_integers_y_before_x():
    text = encode_boxes([Box("mass", 0.1, 0.2, 0.3, 0.4), Box("pleural effusion", 0, 0.5, 1, 1)], "text")
    assert text == "200 100 400 300 mass ; 500 0 999 999 pleural effusion"
    assert [b.label for b in decode_boxes("noise 12 " + text)] == ["mass", "pleural effusion"]
    with pytest.raises(ValueError):
        encode_box(Box("mass", 0, 0, 1, 1), "json")


def test_loc_groups_win_over_digits_in_the_label():
    (b,) = decode_boxes("<loc0100><loc0200><loc0300><loc0400> mass 2")
    assert b.label == "mass 2" and b.y_min == 100 / 1023


def test_well_formed_answers_of_either_format():
    from xray_train.evaluate import detect_answer_well_formed

    assert detect_answer_well_formed("200 100 400 300 mass ; 500 0 999 999 pleural effusion")
    assert detect_answer_well_formed("<loc0200><loc0100><loc0400><loc0300> mass")
    assert not detect_answer_well_formed("200 100 400 mass")
    assert not detect_answer_well_formed("200 100 400 300")
