"""The fast path (bf16 autocast, torch.compile) computes the same function as the plain fp32 path."""

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator

PRESETS = ["vit-tiny-test", "swin-tiny-test"]


def _inputs(config, batch=4, seed=0):
    torch.manual_seed(seed)
    generator = SimMIMMaskGenerator.from_config(config, seed=seed)
    mask = torch.from_numpy(np.stack([generator() for _ in range(batch)]))
    return torch.randn(batch, 3, config.image_size, config.image_size), mask


def _loss_and_grads(model, pixel_values, mask, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(pixel_values, bool_masked_pos=mask).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_autocast_matches_fp32(preset):
    config = SimMIMConfig.from_preset(preset, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(config).train()
    pixel_values, mask = _inputs(config)
    loss32, grads32 = _loss_and_grads(model, pixel_values, mask, autocast=False)
    loss16, grads16 = _loss_and_grads(model, pixel_values, mask, autocast=True)
    assert torch.allclose(loss16, loss32, rtol=2e-2, atol=1e-3), (loss16, loss32)
    assert grads32.keys() == grads16.keys()
    for name, g32 in grads32.items():
        g16 = grads16[name].float()
        # relative error of the whole tensor, as bf16 (8 mantissa bits) allows: up to 0.07 with 2 CPU threads, 0.17
        # with one (the single-thread CPU kernels accumulate differently); a wrong gradient is off by far more
        error = (g16 - g32).norm() / g32.norm().clamp_min(1e-12)
        assert error < 0.25, f"{name}: relative gradient error {error:.3g}"


@pytest.mark.parametrize("preset", PRESETS)
def test_torch_compile_has_no_graph_breaks(preset):
    config = SimMIMConfig.from_preset(preset)
    model = SimMIMForMaskedImageModeling(config).train()
    pixel_values, mask = _inputs(config)
    explanation = dynamo.explain(model)(pixel_values, bool_masked_pos=mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_model_matches_eager():
    config = SimMIMConfig.from_preset("vit-tiny-test", drop_path_rate=0.0)
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(config).eval()
    pixel_values, mask = _inputs(config)
    with torch.no_grad():
        eager = model(pixel_values, bool_masked_pos=mask)
        compiled = torch.compile(model, backend="aot_eager")(pixel_values, bool_masked_pos=mask)
    assert torch.allclose(compiled.loss, eager.loss, atol=1e-6)
    assert torch.allclose(compiled.reconstruction, eager.reconstruction, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_model_takes_float32_images_and_computes_the_loss_in_float32(preset):
    """A model loaded in bf16 takes the image processor's float32 pixel_values (as transformers' ViT/Swin do), and
    the masked mean runs in float32: a bf16 sum over many pixels keeps only ~3 significant digits."""
    config = SimMIMConfig.from_preset(preset)
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(config).eval()
    pixel_values, mask = _inputs(config)
    with torch.no_grad():
        out = model.to(torch.bfloat16)(pixel_values, bool_masked_pos=mask)
    assert out.reconstruction.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    m = mask.repeat_interleave(config.patch_size, 1).repeat_interleave(config.patch_size, 2)[:, None].double()
    error = (pixel_values.double() - out.reconstruction.double()).abs() * m
    expected = error.sum() / (m.sum() + 1e-5) / 3
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_attention_calls_sdpa_with_4d_inputs(preset, monkeypatch):
    """SDPA's fused CUDA kernels (memory-efficient, cuDNN) take 4-D inputs only; 5-D inputs (Swin's
    (batch, windows, heads, N, head_dim)) silently fall back to the math kernel."""
    import torch.nn.functional as F

    from hf_simmim.models import modeling_layers

    shapes, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        shapes.append((q.ndim, None if attn_mask is None else attn_mask.ndim))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(modeling_layers.F, "scaled_dot_product_attention", recording_sdpa)
    config = SimMIMConfig.from_preset(preset)
    model = SimMIMForMaskedImageModeling(config).eval()
    pixel_values, mask = _inputs(config)
    with torch.no_grad():
        model(pixel_values, bool_masked_pos=mask)
    assert shapes and all(q_ndim == 4 and mask_ndim in (None, 3, 4) for q_ndim, mask_ndim in shapes), shapes
