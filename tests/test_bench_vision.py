"""The vision benchmark's compile variants time the same forward as the eager tower."""

import torch

from tests.conftest import benchmark
from xray_train.features import pooled_vision_features
from xray_train.gemma3 import vision_encoder_layers

bench = benchmark("bench_vision")


def test_compile_variants_compute_the_eager_features():
    model = bench.vision_model(tiny=True, device="cpu")
    pixels = torch.rand(2, 3, 112, 112, dtype=torch.bfloat16) * 2 - 1
    eager = pooled_vision_features(model, pixels)
    per_layer = bench.compiled_variant(model, "layers")
    assert all(layer._compiled_call_impl is not None for layer in vision_encoder_layers(model))
    torch.testing.assert_close(per_layer(pixels), eager, atol=0.05, rtol=0.05)
    # The whole-tower variant must not also run the layers' own compiled forwards from the variant before.
    tower = bench.compiled_variant(model, "tower")
    assert all(layer._compiled_call_impl is None for layer in vision_encoder_layers(model))
    torch.testing.assert_close(tower(pixels), eager, atol=0.05, rtol=0.05)
