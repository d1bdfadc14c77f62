"""The ``xray-train`` command line: parses arguments and calls the library. No logic lives here.

Over 400 lines because every command's options and help text are declared here, on one page.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperCommand

from xray_train.errors import Interrupted, XrayTrainError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="xray-train",
    help="Fine-tune MedGemma-4B into a chest X-ray report + <loc> box assistant (two-phase QLoRA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: typer's rich panels print flags as "--overwrite <bool>", which reads as if
    # "--overwrite true" were the way to pass them.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True, rich_markup_mode=None)
config_app = typer.Typer(help="Check configs.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

class PlainHelp(TyperCommand):
    """Help in click's plain notation: typer writes a required argument as ``{ADAPTER_DIR}`` in the usage
    line and a list argument's type as ``<list[Path]>``, which read as syntax to type."""

    def get_help(self, ctx) -> str:
        text = super().get_help(ctx)
        usage, _, rest = text.partition("\n")
        usage = re.sub(r"\{([A-Z_]+(?:\.\.\.)?)\}(?:\.\.\.)?", r"\1", usage)
        # Padded to the same width, so the help column stays aligned.
        rest = re.sub(r"<list\[(\w+)\]>", lambda m: f"<{m.group(1).lower()}>".ljust(len(m.group(0))), rest)
        return f"{usage}\n{rest}"


ConfigOpt = typer.Option(..., "--config", "-c", help="Run config YAML (see configs/).", show_default=False)


def set_option(example: str):
    """``--set KEY=VALUE`` with an example that fits the command it is on."""
    return typer.Option(
        None, "--set", "-s", metavar="KEY=VALUE",
        help=f"Override a config key, e.g. --set {example} (repeatable; a list is written [a,b]).",
    )


TrainSetOpt = set_option("training.learning_rate=1e-4")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace a finished output_dir instead of refusing.")


def torch_build() -> str:
    """torch's own version string (with its build tag: ``2.14.1+cu130``, ``2.13.0+cpu``; the package
    metadata drops it for PyPI's CUDA wheels), whether CUDA is usable here and on which GPUs: what a bug
    report needs to tell one install from another."""
    import torch

    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        return f"{build}, CPU-only build (no CUDA)"
    build += f" (CUDA {torch.version.cuda})"
    if not torch.cuda.is_available():
        return f"{build}, CUDA not usable here (no GPU or driver visible)"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{build}, CUDA usable: {len(gpus)} GPU{'s' if len(gpus) != 1 else ''} ({', '.join(gpus)})"


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from xray_train import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{name} {installed(name)}" for name in ("transformers", "peft", "bitsandbytes"))
    console.print(f"xray-train {__version__} (Python {sys.version.split()[0]}, {deps})", highlight=False, soft_wrap=True)
    console.print(torch_build(), highlight=False, soft_wrap=True)
    raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version (and transformers, peft, "
        "bitsandbytes, torch with its build and GPUs) and exit."
    ),
) -> None:
    pass


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
    _silence_what_users_cannot_act_on()


def _silence_what_users_cannot_act_on() -> None:
    from xray_train.quiet import silence_what_users_cannot_act_on

    silence_what_users_cannot_act_on()


def _load(config: Path, overrides: Optional[list[str]], phase: str | None = None):
    from xray_train.config import load_config

    cfg = load_config(config, overrides or [])
    if phase is not None and cfg.phase != phase:
        raise XrayTrainError(f"{config}: phase is {cfg.phase}; run `xray-train {cfg.phase}` for it")
    return cfg


NumGpusOpt = typer.Option(
    None, "--num-gpus", min=1, help="Train data-parallel on N GPUs of this host (runs `accelerate launch`)."
)
AccelConfigOpt = typer.Option(
    None, "--accelerate-config", help="accelerate config for --num-gpus (default configs/accelerate/ddp.yaml)."
)


def _maybe_relaunch(num_gpus: Optional[int], accelerate_config: Optional[Path]) -> None:
    """``--num-gpus N``: become ``accelerate launch --num_processes N ... xray-train <same args>``."""
    if num_gpus is None:
        return
    from xray_train.launch import launch, strip_launch_options

    launch(num_gpus, strip_launch_options(sys.argv[1:])[2], accelerate_config)


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _train(cfg, **kwargs) -> Path:
    """``train.run``, with Ctrl-C answered by what a rerun of the same command will do."""
    # Imported after the config is checked: a bad config fails before torch and transformers load.
    from xray_train.run_dir import RunDir
    from xray_train.train import run

    try:
        return run(cfg, echo=console.print, **kwargs)
    except KeyboardInterrupt:
        if not _is_main_rank():
            raise Interrupted("") from None
        last = RunDir(cfg.output_dir).last_good_checkpoint()
        if last is not None:
            raise Interrupted(f"interrupted: rerun the same command to resume from {last.name} in {cfg.output_dir}") from None
        raise Interrupted(
            f"interrupted before the first checkpoint (one is saved every {cfg.training.save_steps} steps): "
            "rerunning the same command starts from the beginning"
        ) from None


@app.command()
def phase1(
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = TrainSetOpt,
    overwrite: bool = OverwriteOpt,
    num_gpus: Optional[int] = NumGpusOpt,
    accelerate_config: Optional[Path] = AccelConfigOpt,
):
    """Phase 1: report SFT on PadChest. Rerunning the same command resumes from the latest checkpoint."""
    _maybe_relaunch(num_gpus, accelerate_config)
    _setup_logging()
    cfg = _load(config, set_, "phase1")
    out = _train(cfg, overwrite=overwrite)
    if _is_main_rank():
        console.print(f"[green]Phase 1 done.[/green] Adapter and processor in {out}")


@app.command()
def phase2(
    config: Path = ConfigOpt,
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Phase-1 output dir whose adapter Phase 2 continues (strongly recommended)."
    ),
    set_: Optional[list[str]] = TrainSetOpt,
    overwrite: bool = OverwriteOpt,
    num_gpus: Optional[int] = NumGpusOpt,
    accelerate_config: Optional[Path] = AccelConfigOpt,
):
    """Phase 2: <loc> box SFT (Indiana CXR or another box source), continuing the Phase-1 adapter."""
    _maybe_relaunch(num_gpus, accelerate_config)
    _setup_logging()
    cfg = _load(config, set_, "phase2")
    if resume is not None and not resume.is_dir():
        raise XrayTrainError(f"--resume: directory not found: {resume}")
    out = _train(cfg, resume_from=resume, overwrite=overwrite)
    if _is_main_rank():
        console.print(f"[green]Phase 2 done.[/green] Adapter and processor in {out}")


@app.command("cache-features")
def cache_features_cmd(
    config: Path = ConfigOpt, set_: Optional[list[str]] = set_option("data.image_root=/data/padchest")
):
    """Build the vision-feature cache of a run config's images before training (a killed build continues).

    The cache goes to XRAY_TRAIN_FEATURE_CACHE (default ~/.cache/xray-train/vision-features), ~0.6 MB per image.
    """
    from xray_train.train import cache_features

    _setup_logging()
    cache_features(_load(config, set_), echo=console.print)


@data_app.command("check")
def data_check(
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = set_option("data.image_root=/data/padchest"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON here."),
    strict: bool = typer.Option(
        False, "--strict",
        help="Fail on the first unreadable or malformed row (filters such as lateral views still only count).",
    ),
    no_images: bool = typer.Option(False, "--no-images", help="Skip opening every image (faster)."),
):
    """Read the configured dataset, open every image, and summarise what is usable and why not."""
    from xray_train.config import load_config
    from xray_train.data.check import check_dataset

    # Only the data matters here: a base model that is not downloaded yet is not an error.
    cfg = load_config(config, (set_ or []) + (["data.strict=true"] if strict else []), check_model=False)
    summary = check_dataset(cfg.data, open_images=not no_images, progress=True)
    _print_data_summary(summary)
    if json_out is not None:
        from xray_train.outputs import atomic_write_json

        atomic_write_json(json_out, summary)
        console.print(f"Summary written to {json_out}")
    if not summary["examples"]:
        from xray_train.errors import DataError

        raise DataError(f"no usable examples in {summary['rows_total']} rows of {summary['dataset']} (see above)")


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
    for reason, where in summary.get("looked_for", {}).items():
        _plain(f"first {reason}: {where}")
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
    config_arg: Optional[Path] = typer.Argument(
        None, metavar="CONFIG", help="Same as --config.", show_default=False
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Run config YAML (see configs/).", show_default=False
    ),
    set_: Optional[list[str]] = TrainSetOpt,
    show_example: bool = typer.Option(
        True, "--example/--no-example", help="Also tokenise one example and highlight what is supervised."
    ),
):
    """Check a config (every problem at once) and read its data without loading weights; show one collated example."""
    from xray_train.config import dump_config
    from xray_train.train import run_inputs

    if (config is None) == (config_arg is None):
        raise typer.BadParameter("give the config once: --config CFG", param_hint="--config")
    config = config or config_arg
    cfg = _load(config, set_)
    # The run's own opening steps: its data read, and "auto" settings as a run on this machine decides them.
    inputs = run_inputs(cfg, strict=False)
    read = inputs.read
    console.print(f"[green]{config}: valid[/green] ({cfg.phase}, {cfg.data.dataset}, base {cfg.model.base})")
    if inputs.unresolved:
        console.print(f"settings not resolved: {inputs.unresolved}", style="yellow", markup=False)
    console.print(dump_config(inputs.cfg), markup=False, highlight=False)
    if show_example:
        from xray_train.validate import show_collated_example

        show_collated_example(cfg, console, read)


@app.command("make-tiny-model", cls=PlainHelp)
def make_tiny_model_cmd(
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Folder to write the tiny model into.", show_default=False),
    overwrite: bool = OverwriteOpt,
    image_size: int = typer.Option(64, help="Vision input side in pixels (MedGemma: 896)."),
    patch_size: int = typer.Option(8, help="SigLIP patch size (MedGemma: 14)."),
    mm_tokens: int = typer.Option(16, help="Image tokens after pooling (MedGemma: 256); a square number."),
    hidden_size: int = typer.Option(64, help="Language-model width (MedGemma: 2560)."),
    layers: int = typer.Option(2, help="Language-model layers (MedGemma: 34)."),
):
    """Write a tiny random Gemma 3 model with MedGemma's structure and the real Gemma 3 tokenizer."""
    from xray_train.testing.tiny import make_tiny_model

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


class HeldOut(str, Enum):
    test = "test"
    validation = "validation"


class PredictTask(str, Enum):
    report = "report"
    detect = "detect"
    both = "both"


def _plain(text) -> None:
    """Model output and user paths verbatim: never interpreted as rich markup."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command(cls=PlainHelp)
def evaluate(
    adapter_dir: Path = typer.Argument(
        ..., metavar="ADAPTER_DIR", help="A finished phase1/phase2 output dir (holds adapter_config.json).",
        show_default=False,
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c",
        help="Run config naming the dataset to score on. Default: the config saved in ADAPTER_DIR.",
        show_default=False,
    ),
    set_: Optional[list[str]] = set_option("data.image_root=/data/iu/images"),
    split: HeldOut = typer.Option(HeldOut.test, "--split", help="Held-out split (patients unseen in training)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results JSON to this file."),
    max_samples: Optional[int] = typer.Option(
        None, "--max-samples", min=1, help="Score at most N images of the split (a fixed, seeded subset)."
    ),
    baseline: bool = typer.Option(
        True, "--baseline/--no-baseline", help="Also score the base model with the adapter disabled (side by side)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder for eval_results.json/.md and plots. Default: ADAPTER_DIR (push-to-hub uses them)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace existing eval_results.* (in ADAPTER_DIR: the ones push-to-hub publishes)."
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1,
        help="Images per batch. Default: training.per_device_eval_batch_size (teacher-forced pass) and "
        "model.generate_batch_size, else what the GPU's free memory holds (generation).",
    ),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest generated answer in tokens."),
):
    """Score an adapter on the held-out patient split: token accuracy, finding P/R/F1, boxes (IoU, mAP@0.5).

    Writes eval_results.json, eval_results.md, f1_bars.png and (Phase 2) iou_histogram.png into ADAPTER_DIR (or --out), next to the same numbers for the base model without the adapter. The split is rebuilt exactly as training made it, so no scored patient was trained on.

    Example: xray-train evaluate runs/phase2 --config configs/phase2_indiana.yaml --max-samples 200
    """
    from xray_train.config import load_config
    from xray_train.evaluate import evaluate as run_evaluate
    from xray_train.evaluate import summary_lines
    from xray_train.run_dir import RESOLVED_CONFIG, RunDir

    _setup_logging()
    if config is None:
        run_dir = RunDir(adapter_dir)
        if not run_dir.has_config():
            raise XrayTrainError(f"{adapter_dir} has no {RESOLVED_CONFIG}; pass --config")
        config = run_dir.file(RESOLVED_CONFIG)
    cfg = load_config(config, set_ or [])
    results = run_evaluate(
        adapter_dir, cfg, split=split.value, max_samples=max_samples, baseline=baseline, out_dir=out,
        json_out=json_out, overwrite=overwrite, batch_size=batch_size, max_new_tokens=max_new_tokens,
        echo=_plain,
    )
    console.print(f"[bold]{results['n_examples']} {results['split']} images[/bold] ({results['phase']}):")
    for line in summary_lines(results):
        _plain(line)
    for name, path in results["written"].items():
        _plain(f"{name:>14}: {path}")


@app.command(cls=PlainHelp)
def predict(
    adapter_dir: Path = typer.Argument(
        ..., metavar="ADAPTER_DIR", help="A finished phase1/phase2 output dir (or a downloaded adapter repo).",
        show_default=False,
    ),
    images: list[Path] = typer.Argument(
        ..., metavar="IMAGES...", help="Image files (PNG, JPEG, DICOM) and/or folders of them.", show_default=False
    ),
    out: Path = typer.Option(Path("predictions"), "--out", help="Folder for the annotated PNGs and predictions.jsonl."),
    task: Optional[PredictTask] = typer.Option(
        None, "--task",
        help="report, detect or both. Default: both for a Phase-2 adapter (it has <loc> tokens), report otherwise.",
        show_default=False,
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs in --out."),
    base: Optional[str] = typer.Option(
        None, "--base", help="Base model path or hub id, if not the one recorded at training time."
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1,
        help="Images per generate call. Default: model.generate_batch_size, else what the GPU's free memory holds.",
    ),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest generated answer in tokens."),
):
    """Run an adapter on X-ray images: print the report, draw the boxes on each image.

    Uses the training preprocessing. Writes <name>_pred.png per image (boxes and labels on the original image) and predictions.jsonl (report, parsed findings, boxes in original-image pixels, raw answers).

    Example: xray-train predict runs/phase2 scans/ --out predictions
    """
    from xray_train.predict import predict as run_predict

    _setup_logging()
    run_predict(
        adapter_dir, images, out_dir=out, task=task.value if task else None, overwrite=overwrite, base=base, batch_size=batch_size,
        max_new_tokens=max_new_tokens, echo=_plain,
    )
    console.print(f"[green]Predictions written to[/green] {out}", highlight=False)


@app.command(cls=PlainHelp)
def merge(
    adapter_dir: Path = typer.Argument(
        ..., metavar="ADAPTER_DIR", help="A finished phase1/phase2 output dir.", show_default=False
    ),
    out_dir: Path = typer.Argument(
        ..., metavar="OUT_DIR", help="New folder for the standalone merged model (safetensors + processor).",
        show_default=False,
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    base: Optional[str] = typer.Option(
        None, "--base", help="Base model path or hub id, if not the one recorded at training time."
    ),
):
    """Merge the adapter (LoRA, projector, <loc> rows) into the unquantised base and save a standalone model.

    The base is loaded in the training compute dtype (bf16 for MedGemma), not 4-bit. The saved model is reloaded with AutoModelForImageTextToText and checked against base + adapter on a fixed batch; the differences go to OUT_DIR/merge_check.json.

    Example: xray-train merge runs/phase2 runs/phase2-merged
    """
    from xray_train.merge import merge as run_merge

    _setup_logging()
    report = run_merge(adapter_dir, out_dir, overwrite=overwrite, base=base, echo=_plain)
    logits = report["logits"]
    _plain(
        f"merged ({report['dtype']}): logits max abs diff {logits['max_abs_diff']:.3g}, "
        f"argmax agreement {logits['argmax_agreement']:.3f} over {logits['positions']} positions; "
        + ", ".join(f"{k} max diff {v['max_abs_diff']:.3g}" for k, v in report["weights"].items())
    )
    console.print(f"[green]Merged model written to[/green] {out_dir}", highlight=False)


@app.command("push-to-hub", cls=PlainHelp)
def push_to_hub_cmd(
    adapter_dir: Path = typer.Argument(
        ..., metavar="ADAPTER_DIR", help="A finished phase1/phase2 output dir (run evaluate first).", show_default=False
    ),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repo, ORG/NAME (e.g. my-lab/medgemma-cxr-lora).", show_default=False),
    private: bool = typer.Option(True, "--private/--public", help="Visibility if the repo is created."),
    dry_run: Optional[Path] = typer.Option(
        None, "--dry-run", help="Write exactly what would be uploaded into this new folder; upload nothing."
    ),
    base_model: Optional[str] = typer.Option(
        None, "--base-model",
        help="Hub id of the base (e.g. google/medgemma-4b-it) for the card and adapter_config.json. Required "
        "when model.base was a local folder that does not name its Hub id.",
        show_default=False,
    ),
    force: bool = typer.Option(
        False, "--force", help="Publish under --base-model even when the run's base does not match it."
    ),
):
    """Upload the adapter, processor files and a generated model card to the Hugging Face Hub.

    The card holds what was trained, the evaluation numbers from eval_results.json (if present), a usage snippet and the not-for-clinical-use notice. The token comes from HF_TOKEN or `hf auth login` and is never printed or written. Untrained (all-zero) adapters are refused.

    The run directory is only read. With a local base folder, --base-model names the Hub id the published adapter points at (written to the card and the staged adapter_config.json); it is refused when the run's base is another model (architecture, vocabulary, sizes) unless --force.

    Example: xray-train push-to-hub runs/phase2 --repo-id my-lab/medgemma-cxr-lora --dry-run staged/
    """
    from xray_train.hub import push_to_hub

    _setup_logging()
    result = push_to_hub(adapter_dir, repo_id, private=private, dry_run_dir=dry_run, base_model=base_model,
                         force=force)
    if dry_run is not None:
        files = sorted(p for p in Path(result).iterdir() if p.is_file())
        console.print(f"[bold]Dry run:[/bold] {len(files)} files staged for {repo_id} (nothing uploaded):")
        for path in files:
            _plain(f"  {path.name:<32} {path.stat().st_size:>12,} bytes")
        _plain(f"Staged in {result}")
    else:
        console.print(f"[green]Uploaded to[/green] {result}", highlight=False)


def _own_line() -> None:
    """Ctrl-C leaves the cursor where it struck: at the end of a progress bar's line (the Trainer's bar is
    never closed), after the ``^C`` the terminal echoed. What follows starts on a line of its own."""
    if err_console.is_terminal:
        err_console.file.write("\n")
        err_console.file.flush()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _silence_what_users_cannot_act_on()
    try:
        app()
    except Interrupted as exc:
        _own_line()
        if str(exc):
            err_console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except XrayTrainError as exc:
        from rich.text import Text

        # Messages quote user paths and keys verbatim: never interpret them as markup.
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _own_line()
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
