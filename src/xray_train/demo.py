"""``xray-train demo``: the whole chain on the bundled sample data, on CPU, in a few minutes."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from xray_train.errors import XrayTrainError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIGS = REPO_ROOT / "configs" / "demo"


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

    console.rule("Done")
    for name, path in paths.items():
        console.print(f"{name:>11}: {path}")
    return paths
