"""The ``xray-train`` command line: parses arguments and calls the library. No logic lives here."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from xray_train.errors import XrayTrainError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="xray-train",
    help="Fine-tune MedGemma-4B into a chest X-ray report + <loc> box assistant (two-phase QLoRA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
config_app = typer.Typer(help="Check configs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option(..., "--config", "-c", help="Run config YAML (see configs/).", show_default=False)
SetOpt = typer.Option(
    None, "--set", "-s", help="Override a config key, e.g. --set training.learning_rate=1e-4 (repeatable)."
)
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace a finished output_dir instead of refusing.")


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if not verbose else logging.DEBUG,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(config: Path, overrides: Optional[list[str]], phase: str | None = None):
    from xray_train.config import load_config

    cfg = load_config(config, overrides or [])
    if phase is not None and cfg.phase != phase:
        raise XrayTrainError(f"{config}: phase is {cfg.phase}; run `xray-train {cfg.phase}` for it")
    return cfg


@app.command()
def phase1(
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    overwrite: bool = OverwriteOpt,
):
    """Phase 1: report SFT on PadChest. Rerunning the same command resumes from the latest checkpoint."""
    from xray_train.train import run

    _setup_logging()
    cfg = _load(config, set_, "phase1")
    out = run(cfg, overwrite=overwrite, echo=console.print)
    console.print(f"[green]Phase 1 done.[/green] Adapter and processor in {out}")


@app.command()
def phase2(
    config: Path = ConfigOpt,
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Phase-1 output dir whose adapter Phase 2 continues (strongly recommended)."
    ),
    set_: Optional[list[str]] = SetOpt,
    overwrite: bool = OverwriteOpt,
):
    """Phase 2: <loc> box SFT (Indiana CXR or another box source), continuing the Phase-1 adapter."""
    from xray_train.train import run

    _setup_logging()
    cfg = _load(config, set_, "phase2")
    if resume is not None and not resume.is_dir():
        raise XrayTrainError(f"--resume: directory not found: {resume}")
    out = run(cfg, resume_from=resume, overwrite=overwrite, echo=console.print)
    console.print(f"[green]Phase 2 done.[/green] Adapter and processor in {out}")


@data_app.command("check")
def data_check(
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON here."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first unusable row."),
    no_images: bool = typer.Option(False, "--no-images", help="Skip opening every image (faster)."),
):
    """Read the configured dataset, open every image, and summarise what is usable and why not."""
    from xray_train.config import load_config
    from xray_train.data.check import check_dataset

    cfg = load_config(config, (set_ or []) + (["data.strict=true"] if strict else []))
    summary = check_dataset(cfg.data, open_images=not no_images, progress=True)
    _print_data_summary(summary)
    if json_out is not None:
        from xray_train.outputs import atomic_write_json

        atomic_write_json(json_out, summary)
        console.print(f"Summary written to {json_out}")


def _print_data_summary(summary: dict) -> None:
    from rich.table import Table

    console.print(
        f"[bold]{summary['dataset']}[/bold]: {summary['rows_total']} rows, "
        f"[green]{summary['examples']} usable examples[/green]"
    )
    if summary.get("skipped"):
        table = Table("skipped because", "rows")
        for reason, n in sorted(summary["skipped"].items(), key=lambda kv: -kv[1]):
            table.add_row(reason, str(n))
        console.print(table)
    labels = summary.get("labels") or {}
    if labels:
        top = sorted(labels.items(), key=lambda kv: -kv[1])[:10]
        console.print("top findings: " + ", ".join(f"{k} ({v})" for k, v in top))
    if "boxes_total" in summary:
        console.print(f"boxes: {summary['boxes_total']}")
    if summary.get("splits"):
        console.print("splits: " + ", ".join(f"{k}={v}" for k, v in summary["splits"].items()))


@config_app.command("validate")
def config_validate(
    config: Path = typer.Argument(..., help="Run config YAML."),
    set_: Optional[list[str]] = SetOpt,
    show_example: bool = typer.Option(
        True, "--example/--no-example", help="Also tokenise one example and highlight what is supervised."
    ),
):
    """Check a config (every problem at once) without loading weights; show one collated example."""
    from xray_train.config import dump_config

    cfg = _load(config, set_)
    console.print(f"[green]{config}: valid[/green] ({cfg.phase}, {cfg.data.dataset}, base {cfg.model.base})")
    console.print(dump_config(cfg), markup=False, highlight=False)
    if show_example:
        from xray_train.validate import show_collated_example

        show_collated_example(cfg, console)


@app.command("make-tiny-model")
def make_tiny_model_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write the tiny model into."),
    overwrite: bool = OverwriteOpt,
    image_size: int = typer.Option(64, help="Vision input side in pixels (MedGemma: 896)."),
    patch_size: int = typer.Option(8, help="SigLIP patch size (MedGemma: 14)."),
    mm_tokens: int = typer.Option(16, help="Image tokens after pooling (MedGemma: 256); a square number."),
    hidden_size: int = typer.Option(64, help="Language-model width (MedGemma: 2560)."),
    layers: int = typer.Option(2, help="Language-model layers (MedGemma: 34)."),
):
    """Write a tiny random Gemma 3 model with MedGemma's structure and the real Gemma 3 tokenizer."""
    from xray_train.tiny import make_tiny_model

    path = make_tiny_model(
        out_dir,
        overwrite=overwrite,
        image_size=image_size,
        patch_size=patch_size,
        mm_tokens_per_image=mm_tokens,
        hidden_size=hidden_size,
        num_layers=layers,
    )
    console.print(f"Tiny MedGemma-shaped model written to {path}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where the demo writes its model and runs."),
    overwrite: bool = typer.Option(True, "--overwrite/--keep", help="Start the demo runs fresh."),
):
    """Run the whole chain on the bundled sample data on CPU in a few minutes."""
    from xray_train.demo import run_demo

    _setup_logging()
    run_demo(workdir, overwrite=overwrite, console=console)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except XrayTrainError as exc:
        from rich.text import Text

        # Messages quote user paths and keys verbatim: never interpret them as markup.
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
