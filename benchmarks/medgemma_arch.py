"""MedGemma-4B's architecture with random weights, for GPU benchmarks.

No weights can be downloaded where benchmarks run, so the model is built from its published
configuration, initialised randomly on the GPU, and saved as safetensors next to a MedGemma-like
processor (896 px, 256 image tokens, real Gemma 3 tokenizer). The training code then loads it through
its real path (``AutoModelForImageTextToText.from_pretrained`` + bitsandbytes 4-bit).
"""

from __future__ import annotations

from pathlib import Path


def medgemma_config():
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=262208,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        sliding_window=1024,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-6,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(34)],
        max_position_embeddings=131072,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=[1, 106],
        tie_word_embeddings=True,
    )
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=896,
        patch_size=14,
        vision_use_head=False,
        layer_norm_eps=1e-6,
    )
    return Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=256,
        boi_token_index=255999,
        eoi_token_index=256000,
        image_token_index=262144,
        tie_word_embeddings=True,
    )


def build_random_medgemma(out_dir: Path, seed: int = 0) -> Path:
    """Random-weight MedGemma-4B (bf16 safetensors, ~8.6 GB) + processor in ``out_dir``; reused if present."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from xray_train.testing.tiny import build_processor, reference_tokenizer_dir

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    config = medgemma_config()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Gemma3ForConditionalGeneration(config).to(torch.bfloat16)
    with torch.no_grad():
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, proj.shape[0] ** -0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_processor(reference_tokenizer_dir(), 896, 256).save_pretrained(out_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def parameter_counts(config=None) -> dict[str, float]:
    """Parameter counts used for model-FLOPs: LM body, LM head (tied embedding) and SigLIP."""
    config = config or medgemma_config()
    t, v = config.text_config, config.vision_config
    attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    lm_body = t.num_hidden_layers * (attn + mlp)
    head = t.vocab_size * t.hidden_size
    vis_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    vision = v.num_hidden_layers * vis_layer
    return {
        "lm_body": lm_body,
        "lm_head": head,
        "vision": vision,
        "patches": (v.image_size // v.patch_size) ** 2,
        "layers": t.num_hidden_layers,
        "attention_width": t.num_attention_heads * t.head_dim,
    }
