"""``xray-train predict``: run an adapter on image files and show what it says, boxes drawn on the X-ray.

Images go through the training preprocessing (``generate.Generator``: window, pad to square, resize).
Boxes come back in the prepared square's coordinates and are mapped to the ORIGINAL image with
``Geometry.to_original`` before they are written or drawn, so the JSONL pixel coordinates, the drawn
rectangles and the user's own image all agree. The picture is the windowed original (what a
radiologist would look at), not the 896-px square the model saw.

Per image: ``<name>_pred.png`` and one line of ``predictions.jsonl``::

    {"image": path, "width": W, "height": H, "annotated": "<name>_pred.png",
     "report": text | null, "findings": [{"name", "locations"}] | null, "normal": bool | null,
     "report_well_formed": bool | null,
     "boxes": [{"label", "x_min", "y_min", "x_max", "y_max"}] (original-image pixels) | null,
     "detect_well_formed": bool | null, "raw": {"report": text, "detect": text}}

An unreadable image gets ``{"image": path, "error": message}`` instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

from xray_train.data.images import Geometry, ImageError, load_grayscale, read_image_size, window_to_uint8
from xray_train.data.records import Box
from xray_train.data.reports import parse_report
from xray_train.errors import XrayTrainError
from xray_train.generate import DEFAULT_MAX_NEW_TOKENS, Generator, Request
from xray_train.outputs import atomic_write_bytes, atomic_write_text
from xray_train.run_dir import RunDir

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
ANNOTATED_SUFFIX = "_pred.png"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"}
TASK_CHOICES = ("report", "detect", "both")
# Saturated colours only: an X-ray is grey (r == g == b), so a drawn box is never confused with the image.
PALETTE = [
    (255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 80), (255, 96, 255),
    (255, 140, 0), (0, 255, 200), (180, 120, 255), (255, 0, 128), (160, 255, 0),
]


def label_colour(label: str) -> tuple[int, int, int]:
    """A stable colour per label (same label, same colour, in every picture and run)."""
    key = " ".join(label.casefold().split()).encode("utf-8")
    return PALETTE[int(hashlib.sha256(key).hexdigest(), 16) % len(PALETTE)]


def collect_images(inputs: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files, sorted. Duplicates dropped."""
    found: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            raise XrayTrainError(f"{item}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise XrayTrainError(
            f"no images found in {', '.join(str(i) for i in inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return unique


def saved_settings(adapter_dir: Path) -> dict:
    """Phase, system prompt, image size, <loc> decoding and box format the adapter was trained with (from its
    saved config; an adapter folder without one gets the defaults, and the processor's own image size)."""
    from xray_train.config import ModelConfig, RunConfig, _DataSection

    run_dir = RunDir(adapter_dir)
    if not run_dir.has_config():
        return {"phase": None, "system_prompt": RunConfig.model_fields["system_prompt"].default, "image_size": None,
                "loc_decode": ModelConfig.model_fields["loc_decode"].default,
                "decode_cache": ModelConfig.model_fields["decode_cache"].default,
                "box_format": _DataSection.model_fields["box_format"].default}
    saved = run_dir.config()
    return {"phase": saved.phase, "system_prompt": saved.system_prompt, "image_size": saved.data.image_size,
            "loc_decode": saved.model.loc_decode, "decode_cache": saved.model.decode_cache,
            "box_format": saved.data.box_format}


def tasks_for(task: str) -> list[str]:
    if task not in TASK_CHOICES:
        raise XrayTrainError(f"--task: {task!r} is not one of {', '.join(TASK_CHOICES)}")
    return ["report", "detect"] if task == "both" else [task]


def output_names(images: list[Path]) -> list[str]:
    """``<stem>_pred.png`` per image; a repeated stem (same name in two folders) gets ``-2``, ``-3``."""
    names, seen = [], {}
    for path in images:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}{'' if seen[stem] == 1 else '-' + str(seen[stem])}{ANNOTATED_SUFFIX}")
    return names


def box_to_pixels(box: Box, width: int, height: int) -> dict:
    return {
        "label": box.label,
        "x_min": round(box.x_min * width, 1),
        "y_min": round(box.y_min * height, 1),
        "x_max": round(box.x_max * width, 1),
        "y_max": round(box.y_max * height, 1),
    }


def line_width(width: int, height: int) -> int:
    return max(2, round(min(width, height) / 150))


def image_note(record: dict) -> str | None:
    """What a picture should say about its boxes: why it has none, or that the boxes drawn come from an answer
    not in the box format (which evaluation counts as unparsed); None for the boxes of a well-formed answer."""
    if record.get("boxes") is None:
        return "report only (no boxes asked for)"
    if record["boxes"]:
        return None if record.get("detect_well_formed") else "answer not in the box format: drawn as decoded"
    if record.get("detect_well_formed"):
        return "no box: no localisable finding"
    return "no box: answer not in the box format"


def render(image_path: Path, boxes: list[dict], note: str | None = None):
    """The windowed original as RGB with each box (original-image pixels) outlined and labelled, and
    ``note`` written across the top (a picture with no box must not look like a bare input image)."""
    from PIL import Image, ImageDraw, ImageFont

    gray = window_to_uint8(load_grayscale(image_path))
    image = Image.fromarray(gray).convert("RGB")
    height, width = gray.shape
    draw = ImageDraw.Draw(image)
    stroke = line_width(width, height)
    font = ImageFont.load_default(size=max(10, min(width, height) // 24))
    if note:
        _draw_note(draw, note, width, ImageFont.load_default(size=max(9, min(width, height) // 28)))
    for box in boxes:
        colour = label_colour(box["label"])
        x0, y0 = (min(max(0, round(box[k])), lim - 1) for k, lim in (("x_min", width), ("y_min", height)))
        x1, y1 = (min(max(0, round(box[k])), lim - 1) for k, lim in (("x_max", width), ("y_max", height)))
        # The outline grows inwards from (x0, y0)-(x1, y1): its outer edge is exactly the JSONL box.
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=stroke)
        if box["label"]:
            left, top, right, bottom = draw.textbbox((0, 0), box["label"], font=font)
            tw, th = right - left, bottom - top
            pad = 2
            # Above the box when there is room, otherwise just inside its top edge.
            ty = y0 - th - 2 * pad if y0 - th - 2 * pad >= 0 else y0 + stroke
            tx = min(x0, max(0, width - tw - 2 * pad))
            draw.rectangle([tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad], fill=colour)
            draw.text((tx + pad - left, ty + pad - top), box["label"], fill=(0, 0, 0), font=font)
    return image


def _draw_note(draw, note: str, width: int, font) -> None:
    """``note`` in white on a black band along the top edge, wrapped to the image width."""
    pad = 3
    lines, line = [], ""
    for word in note.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width - 2 * pad:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    text = "\n".join(lines)
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    draw.rectangle([0, 0, width, bottom - top + 2 * pad], fill=(0, 0, 0))
    draw.multiline_text((pad - left, pad - top), text, fill=(255, 255, 255), font=font)


def write_png(image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def check_outputs(out_dir: Path, names: list[str], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise XrayTrainError(f"--out: {out_dir} exists and is not a directory")
    if overwrite:
        return
    existing = [out_dir / n for n in [PREDICTIONS_FILE, *names] if (out_dir / n).exists()]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise XrayTrainError(f"{existing[0]}{more} exist; pass --overwrite to replace them or choose another --out")


def build_record(image: Path, name: str, texts: dict[str, str | None], errors: list[str]) -> dict:
    if errors:
        return {"image": str(image), "error": errors[0]}
    width, height = read_image_size(image)
    record: dict = {"image": str(image), "width": width, "height": height, "annotated": name}
    report = texts.get("report")
    if "report" in texts:
        parsed = parse_report(report)
        record.update(
            report=report,
            findings=[{"name": f.name, "locations": list(f.locations)} for f in parsed.findings],
            normal=parsed.is_normal,
            report_well_formed=parsed.well_formed,
        )
    else:
        record.update(report=None, findings=None, normal=None, report_well_formed=None)
    if "detect" in texts:
        from xray_train.evaluate import boxes_from_answer, detect_answer_well_formed

        geometry = Geometry(width, height, 0)
        boxes = boxes_from_answer(texts["detect"], geometry) or []
        record.update(
            boxes=[box_to_pixels(b, width, height) for b in boxes],
            detect_well_formed=detect_answer_well_formed(texts["detect"]),
        )
    else:
        record.update(boxes=None, detect_well_formed=None)
    record["raw"] = dict(texts)
    return record


def predict(
    adapter_dir: Path | str,
    inputs: list[Path | str],
    out_dir: Path | str = Path("predictions"),
    task: str | None = None,
    overwrite: bool = False,
    base: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    model=None,
    processor=None,
    progress: bool = True,
    echo=print,
) -> list[dict]:
    """Answer the task(s) for every image; write annotated PNGs and ``predictions.jsonl`` to ``out_dir``.

    ``task`` defaults to ``both`` for an adapter with trained ``<loc>`` tokens (Phase 2), else ``report``.
    ``model``/``processor`` reuse an adapter already loaded with ``model.load_adapter``.
    """
    run_dir = RunDir(adapter_dir).require_adapter()
    adapter_dir, out_dir = run_dir.path, Path(out_dir)
    settings = saved_settings(adapter_dir)
    # A plain-text-box adapter (data.box_format: text) detects without added <loc> rows.
    has_loc = run_dir.has_loc_rows() or (settings["phase"] == "phase2" and settings["box_format"] == "text")
    task = task or ("both" if has_loc else "report")
    tasks = tasks_for(task)
    if "detect" in tasks and not has_loc:
        raise XrayTrainError(
            f"--task {task}: {adapter_dir} has no trained <loc> tokens (a Phase-1 adapter); use --task report"
        )
    images = collect_images([Path(i) for i in inputs])
    names = output_names(images)
    check_outputs(out_dir, names, overwrite)
    # Every image decoded before the model loads: a corrupt file is one line, said once, at once.
    unreadable = unreadable_images(images)
    if len(unreadable) == len(images):
        first = unreadable[images[0]]
        raise XrayTrainError(first if len(images) == 1 else f"no image could be read ({len(images)} files; {first})")
    readable = [image for image in images if image not in unreadable]

    if model is None:
        from xray_train.inference import load_for_inference

        model_cfg = run_dir.config().model if run_dir.has_config() else None
        model, processor, _ = load_for_inference(adapter_dir, model_cfg, base=base, echo=echo)
        batch_size = batch_size or (model_cfg.generate_batch_size if model_cfg else None)
    generator = Generator(model, processor, settings["system_prompt"], settings["image_size"], max_new_tokens, batch_size,
                          loc_decode=settings["loc_decode"], decode_cache=settings["decode_cache"])
    # One pass per task, so the bar counts images ("1/1" for one image), not image-task pairs.
    answers_by_task = {
        t: dict(zip(readable, generator([Request(image, t) for image in readable], progress=progress,
                                        description=f"Predicting ({t})")))
        for t in tasks
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for image, name in zip(images, names):
        if image in unreadable:
            record = {"image": str(image), "error": unreadable[image]}
            records.append(record)
            echo_record(record, echo)
            continue
        answers = {t: answers_by_task[t][image] for t in tasks}
        errors = [g.error for g in answers.values() if g.error]
        try:
            record = build_record(image, name, {t: g.text for t, g in answers.items()}, errors)
            if "error" not in record:
                write_png(render(image, record["boxes"] or [], image_note(record)), out_dir / name)
        except ImageError as exc:  # the file changed or broke between generation and drawing
            record = {"image": str(image), "error": str(exc)}
        records.append(record)
        echo_record(record, echo)
    atomic_write_text(out_dir / PREDICTIONS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    if all("error" in r for r in records):
        raise XrayTrainError(f"no image could be read ({records[0]['error']})")
    return records


def unreadable_images(images: list[Path]) -> dict[Path, str]:
    """image -> why it cannot be read, for each image that does not decode."""
    bad = {}
    for image in images:
        try:
            load_grayscale(image)
        except ImageError as exc:
            bad[image] = str(exc)
    return bad


def echo_record(record: dict, echo=print) -> None:
    echo(f"== {record['image']}")
    if "error" in record:
        echo(f"   unreadable: {record['error']}")
        return
    if record.get("report") is not None:
        if record["report_well_formed"]:
            echo(record["report"])
        else:
            echo(f"report: not in the trained format: {preview(record['report'])}")
    if record.get("boxes") is not None:
        if not record["boxes"]:
            echo("boxes: none" + (" (no localisable finding)" if record["detect_well_formed"]
                                  else f" (answer not in the box format: {preview(record['raw']['detect'])})"))
        for b in record["boxes"][:ECHOED_BOXES]:
            echo(f"box: {b['label'] or '(no label)'}  x {b['x_min']:.0f}-{b['x_max']:.0f}, "
                 f"y {b['y_min']:.0f}-{b['y_max']:.0f} px")
        if len(record["boxes"]) > ECHOED_BOXES:
            echo(f"... and {len(record['boxes']) - ECHOED_BOXES} more boxes (all of them are in the JSONL and the image)")
    echo(f"   -> {record['annotated']}")


#: Boxes of one image listed on the console; an untrained model can write dozens.
ECHOED_BOXES = 8


#: Characters of an answer in an unexpected format shown on the console; the whole text is in the JSONL.
PREVIEW_CHARS = 80


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """An answer on one line, cut at ``limit`` characters: an untrained model can write pages of
    tokens from every script, which would bury the rest of the output."""
    flat = " ".join((text or "").split())
    if len(flat) <= limit:
        return f'"{flat}"'
    return f'"{flat[:limit]}..." ({len(flat)} characters; the full answer is in {PREDICTIONS_FILE})'
