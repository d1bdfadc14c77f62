"""``xray-train demo``: the whole chain on the bundled sample data, on CPU, in a few minutes:
tiny model -> data check -> Phase 1 -> Phase 2 (continuing Phase 1) -> evaluate both -> predict 3 images."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from xray_train.errors import XrayTrainError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIGS = REPO_ROOT / "configs" / "demo"
#: A demo report is ~40 tokens; an undertrained tiny model that never stops would otherwise spend
#: 256 steps of a 262k-row LM head per answer on CPU.
DEMO_MAX_NEW_TOKENS = 128


def demo_config(name: str) -> Path:
    path = DEMO_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise XrayTrainError(f"demo config not found: {path} (the demo runs from a source checkout: pip install -e .)")
    return path


def run_demo(workdir: Path, overwrite: bool = True, console: Console | None = None) -> dict[str, Path]:
    from xray_train.config import load_config
    from xray_train.data.check import check_dataset
    from xray_train.tiny import make_tiny_model
    from xray_train.train import run

    console = console or Console()
    workdir = Path(workdir)
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

    evaluation, predictions = evaluate_and_predict(cfg1, cfg2, paths, workdir, overwrite, console)
    paths.update(predictions=predictions)

    console.rule("Done")
    for name, path in paths.items():
        console.print(f"{name:>11}: {path}", highlight=False)
    for name, results in evaluation.items():
        console.print(
            f"{name} ({results['dataset']} {results['split']}, {results['n_examples']} images): "
            f"F1 {_num(results['f1'])} (base {_num((results['baseline'] or {}).get('f1'))}), "
            f"token accuracy {_num(results['token_accuracy'])}"
            + (f", mean IoU {_num(results['iou'])}" if results.get("iou") is not None else "")
            + f"; table in {results['written']['markdown']}",
            highlight=False,
        )
    console.print(
        "A tiny random model trained for a few CPU steps: the numbers show the pipeline works, not that "
        f"the model does. Next: `xray-train push-to-hub {paths['phase2']} --repo-id ORG/NAME --dry-run staged/`.",
        highlight=False,
    )
    return paths


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
    evaluation["phase1"] = evaluate(paths["phase1"], cfg1, split="test", max_new_tokens=DEMO_MAX_NEW_TOKENS, echo=echo)
    for line in summary_lines(evaluation["phase1"]):
        echo(line)

    console.rule("Evaluate: Phase-2 adapter on the Indiana test split (adapter vs base)")
    model, processor = load_adapter(paths["phase2"])
    evaluation["phase2"] = evaluate(
        paths["phase2"], cfg2, split="test", max_new_tokens=DEMO_MAX_NEW_TOKENS, model=model, processor=processor,
        echo=echo,
    )
    for line in summary_lines(evaluation["phase2"]):
        echo(line)

    console.rule("Predict: report + boxes drawn on 3 held-out Indiana images")
    samples, _ = select_examples(cfg2, "test")
    predictions = workdir / "predictions"
    predict(
        paths["phase2"], [ex.image_path for ex in samples[:3]], predictions, task="both",
        overwrite=overwrite, max_new_tokens=DEMO_MAX_NEW_TOKENS, model=model, processor=processor, echo=echo,
    )
    return evaluation, predictions
