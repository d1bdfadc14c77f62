"""In-graph NF4 dequantisation gives bitsandbytes' weights, loss and gradients (4-bit tiny base, CPU)."""

from __future__ import annotations

import pytest
import torch

from xray_train.gemma3 import decoder_layers
from xray_train.loss import targets_only_loss
from xray_train.model import build_training_model
from xray_train.nf4 import dequantize_nf4

from .test_loss import CHUNK, _batch, _config, _grads, _perturb_lora


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 64), (33, 128), (640, 256)])  # 33x128/64 = 66 scales: a partial nested block
def test_dequantize_matches_bitsandbytes_bit_for_bit(shape, double_quant):
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.bfloat16) * 0.05
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    nested = (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset) if double_quant else None
    ours = dequantize_nf4(packed, state.code, state.absmax, state.blocksize, tuple(state.shape), torch.bfloat16, nested)
    assert torch.equal(ours, bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_in_graph_dequantisation_gives_bitsandbytes_loss_and_gradients(tiny_model_dir, phase):
    import bitsandbytes as bnb

    runs = {}
    for in_graph in (False, True):
        cfg = _config(tiny_model_dir, phase, dequantize_in_graph=in_graph)
        torch.manual_seed(0)  # LoRA A's initialisation draws from the global generator
        model, proc = build_training_model(cfg)
        layers = decoder_layers(model)
        quantised = [m for m in layers.modules() if isinstance(m, bnb.nn.Linear4bit)]
        switched = [type(m).__name__ == "InGraphLinear4bit" for m in quantised]
        assert switched and all(s == in_graph for s in switched)
        _perturb_lora(model)
        _, cached = _batch(model, proc, "report" if phase == "phase1" else "detect")
        model.train()
        out = targets_only_loss(model, cached, CHUNK, grad_in_forward=False)
        runs[in_graph] = (out.loss_sum.detach(), _grads(model, out), model.state_dict().keys())
    (plain_loss, plain_grads, plain_keys), (fast_loss, fast_grads, fast_keys) = runs[False], runs[True]
    torch.testing.assert_close(fast_loss, plain_loss)
    assert fast_grads.keys() == plain_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], msg=name)
    assert fast_keys == plain_keys  # nothing extra would be saved in checkpoints
