"""``xray-train demo``: the whole chain on the bundled sample data, on CPU, in a few minutes:
tiny model -> data check -> Phase 1 -> Phase 2 (continuing Phase 1) -> evaluate both -> predict 3 images."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from xray_train.bundled import CONFIGS
from xray_train.errors import XrayTrainError

DEMO_CONFIGS = CONFIGS / "demo"
#: A demo report is ~40 tokens; an undertrained tiny model that never stops would otherwise spend
#: 256 steps of a 262k-row LM head per answer on CPU.
DEMO_MAX_NEW_TOKENS = 128
#: What the demo's model is, said before anything runs so that its answers are read for what they are.
DEMO_MODEL = (
    "The demo model is tiny and random: MedGemma's structure and real tokenizer at toy width, trained "
    "for a few CPU steps per phase on the bundled synthetic films."
)
#: What the demo can show whatever its model, and what it cannot.
CAN_SHOW = (
    "that every step of the chain runs on this machine (data checks, 4-bit QLoRA training of both phases, "
    "evaluation next to the base model, predictions drawn on X-rays), and what each output looks like"
)
CANNOT_SHOW = "how well a trained MedGemma reports or localises findings: train on the real datasets for that (README)"


def demo_config(name: str) -> Path:
    path = DEMO_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise XrayTrainError(f"demo config not found: {path} (a broken install? reinstall xray-train)")
    return path


def run_demo(workdir: Path, overwrite: bool = True, console: Console | None = None) -> dict[str, Path]:
    from xray_train.config import load_config
    from xray_train.data.check import check_dataset
    from xray_train.testing.tiny import make_tiny_model
    from xray_train.train import run

    console = console or Console()
    workdir = Path(workdir)
    console.print(f"{DEMO_MODEL}\nIt shows {CAN_SHOW}.\nIt cannot show {CANNOT_SHOW}.", highlight=False)
    tiny = workdir / "tiny-medgemma"
    if not (tiny / "config.json").is_file():
        console.rule("Building the tiny MedGemma-shaped model (real Gemma 3 tokenizer)")
        make_tiny_model(tiny)
    paths = {"tiny_model": tiny, "phase1": workdir / "phase1", "phase2": workdir / "phase2"}
    common = [f"model.base={tiny}"]
    cfg1 = load_config(demo_config("phase1"), common + [f"output_dir={paths['phase1']}"])
    cfg2 = load_config(demo_config("phase2"), common + [f"output_dir={paths['phase2']}"])

    for cfg in (cfg1, cfg2):
        console.rule(f"Data check: {cfg.data.dataset}")
        summary = check_dataset(cfg.data, open_images=True, progress=True)
        console.print(
            f"{summary['rows_total']} rows -> {summary['examples']} usable; skipped {summary['skipped']}"
        )
    console.rule("Phase 1: report SFT (PadChest sample)")
    run(cfg1, overwrite=overwrite, echo=console.print)
    console.rule("Phase 2: <loc> box SFT (Indiana sample), continuing Phase 1")
    run(cfg2, resume_from=paths["phase1"], overwrite=overwrite, echo=console.print)

    evaluation, predictions, records = evaluate_and_predict(cfg1, cfg2, paths, workdir, overwrite, console)
    paths.update(predictions=predictions)

    console.rule("Done")
    for name, path in paths.items():
        console.print(f"{name:>11}: {path}", highlight=False)
    for line in outcome_lines(evaluation, records):
        console.print(line, highlight=False)
    console.print(
        f"Next: `xray-train push-to-hub {paths['phase2']} --repo-id ORG/NAME --dry-run staged/` shows what "
        "would be published.",
        highlight=False,
    )
    return paths


def outcome_lines(evaluation: dict[str, dict], records: list[dict]) -> list[str]:
    """What the demo's model actually did, in words, and what that does and does not mean."""
    from xray_train.metrics import parsed_of

    lines = []
    for name, r in evaluation.items():
        n = r["n_examples"]
        kind = "box answers" if r["phase"] == "phase2" else "reports"
        base = r.get("baseline") or {}
        lines.append(
            f"{name}: {parsed_of(r, n)} {r['split']} {kind} in the trained format"
            + (f" (base {parsed_of(base, n)})" if base else "")
            + f"; F1 {_num(r['f1'])} (base {_num(base.get('f1'))}), token accuracy {_num(r['token_accuracy'])}"
            + (f", mean IoU {_num(r['iou'])}" if r.get("iou") is not None else "")
            + f"; table in {r['written']['markdown']}"
        )
    boxes = sum(len(rec.get("boxes") or []) for rec in records)
    drawn = sum("error" not in rec for rec in records)
    lines.append(
        f"predictions: {boxes} box{'es' if boxes != 1 else ''} on {drawn} image{'s' if drawn != 1 else ''}"
        + ("; each picture says why it has none" if boxes == 0 else "")
    )
    if all(r["n_examples"] and r.get("n_unparsed") == r["n_examples"] for r in evaluation.values()):
        lines.append(
            "No answer was in the trained format, so the scores are 0: expected for a model this small and "
            "this briefly trained, not a fault of the pipeline."
        )
    lines.append(f"The demo shows {CAN_SHOW}. It cannot show {CANNOT_SHOW}.")
    return lines


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def evaluate_and_predict(cfg1, cfg2, paths: dict, workdir: Path, overwrite: bool, console: Console):
    """Score each adapter on its dataset's held-out split; draw the Phase-2 adapter's answers on 3 images."""
    from xray_train.evaluate import evaluate, select_examples, summary_lines
    from xray_train.model import load_adapter
    from xray_train.predict import predict

    def echo(text):
        console.print(text, markup=False, highlight=False)

    evaluation = {}
    console.rule("Evaluate: Phase-1 adapter on the PadChest test split (adapter vs base)")
    evaluation["phase1"] = evaluate(
        paths["phase1"], cfg1, split="test", max_new_tokens=DEMO_MAX_NEW_TOKENS, overwrite=overwrite, echo=echo
    )
    for line in summary_lines(evaluation["phase1"]):
        echo(line)

    console.rule("Evaluate: Phase-2 adapter on the Indiana test split (adapter vs base)")
    model, processor = load_adapter(paths["phase2"])
    evaluation["phase2"] = evaluate(
        paths["phase2"], cfg2, split="test", max_new_tokens=DEMO_MAX_NEW_TOKENS, overwrite=overwrite, model=model,
        processor=processor, echo=echo,
    )
    for line in summary_lines(evaluation["phase2"]):
        echo(line)

    console.rule("Predict: report + boxes drawn on 3 held-out Indiana images")
    samples, _ = select_examples(cfg2, "test")
    predictions = workdir / "predictions"
    records = predict(
        paths["phase2"], [ex.image_path for ex in samples[:3]], predictions, task="both",
        overwrite=overwrite, max_new_tokens=DEMO_MAX_NEW_TOKENS, model=model, processor=processor, echo=echo,
    )
    return evaluation, predictions, records
