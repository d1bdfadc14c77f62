"""``xray-train config validate``: show what one training example looks like, without loading weights."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from xray_train.collate import PHASE_TASK, PromptEncoder, describe_supervision
from xray_train.config import RunConfig
from xray_train.data.records import ReadResult
from xray_train.data.registry import read_dataset
from xray_train.errors import XrayTrainError
from xray_train.inputs import build_target


def load_processor_for(cfg: RunConfig):
    """The base's processor (tokenizer + image processor): small files, no weights."""
    from transformers import AutoProcessor

    from xray_train.model import add_loc_tokens

    try:
        processor = AutoProcessor.from_pretrained(cfg.model.base, revision=cfg.model.revision)
    except OSError as exc:
        raise XrayTrainError(f"model.base: cannot load the processor of {cfg.model.base}: {str(exc).splitlines()[0]}") from None
    if cfg.add_loc_tokens:
        add_loc_tokens(processor.tokenizer)
    return processor


def show_collated_example(cfg: RunConfig, console: Console, read: ReadResult | None = None) -> None:
    """Tokenise the first example of ``read`` (by default, the dataset read now) and show what is supervised."""
    read = read if read is not None else read_dataset(cfg.data.model_copy(update={"strict": False}))
    if not read.examples:
        console.print("[yellow]no usable example to show (see `xray-train data check`)[/yellow]")
        return
    try:
        processor = load_processor_for(cfg)
    except XrayTrainError as exc:
        # The message quotes paths and hub ids verbatim: styled, never parsed as markup.
        console.print(Text(f"example not shown: {exc}", style="yellow"))
        return
    encoder = PromptEncoder(processor, cfg.system_prompt)
    example = read.examples[0]
    encoded = encoder.encode(PHASE_TASK[cfg.phase], build_target(example, cfg.phase, cfg.data.box_format))
    n_sup = sum(1 for label in encoded["labels"] if label != -100)
    console.print(
        f"\nExample {example.image_id}: {len(encoded['input_ids'])} tokens, {n_sup} supervised "
        "([bold green]green[/bold green] = trained on; everything else is masked with -100):"
    )
    text = Text()
    for piece, supervised in describe_supervision(encoder, encoded):
        text.append(piece, style="bold green" if supervised else "dim")
    console.print(text)
