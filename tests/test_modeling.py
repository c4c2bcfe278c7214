"""The models: save/load round trips through the Auto classes, mask formats, the loss against hand computations,
mask token types, gradient checkpointing, drop path, output shapes, fine-tuning from a pretraining checkpoint,
the Trainer, and loading with `trust_remote_code` where hf_simmim is not importable."""

import io
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_parameters_
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)

from hf_simmim import (
    SimMIMConfig,
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMImageProcessor,
    SimMIMMaskGenerator,
    SimMIMModel,
    simmim_loss,
)
from hf_simmim.models.modeling_layers import drop_path

PRESETS = ["vit-tiny-test", "swin-tiny-test"]


def make_inputs(config, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, config.num_channels, config.image_size, config.image_size, generator=generator)
    masks = SimMIMMaskGenerator.from_config(config, seed=seed)
    return pixel_values, torch.from_numpy(np.stack([masks() for _ in range(batch)]))


def pixel_mask(mask_grid, patch_size):
    """(B, g, g) 0/1 -> (B, 1, g*p, g*p) float64 numpy, by a Kronecker product (independent of the model's
    repeat_interleave)."""
    grid = np.asarray(mask_grid, dtype=np.float64)
    return np.stack([np.kron(g, np.ones((patch_size, patch_size))) for g in grid])[:, None]


def assert_same_state_dict(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())
    assert buffers_a.keys() == buffers_b.keys()
    for key in buffers_a:
        assert torch.equal(buffers_a[key], buffers_b[key]), key


# ---------------------------------------------------------------------------------------------- save / load
MODEL_KINDS = {
    "mim": (SimMIMForMaskedImageModeling, AutoModelForMaskedImageModeling),
    "base": (SimMIMModel, AutoModel),
    "classification": (SimMIMForImageClassification, AutoModelForImageClassification),
}


def outputs_of(model, kind, pixel_values, mask):
    with torch.no_grad():
        if kind == "mim":
            out = model(pixel_values, bool_masked_pos=mask)
            return [out.loss, out.reconstruction]
        if kind == "base":
            out = model(pixel_values, bool_masked_pos=mask, output_hidden_states=True)
            return [out.last_hidden_state, out.pooler_output, *out.hidden_states]
        return [model(pixel_values).logits]


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_round_trip_bit_for_bit(preset, kind, tmp_path):
    model_class, auto_class = MODEL_KINDS[kind]
    config = SimMIMConfig.from_preset(preset, num_labels=5)
    torch.manual_seed(0)
    model = perturb_parameters_(model_class(config)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()
    on_disk = load_file(tmp_path / "model.safetensors")
    assert on_disk.keys() == model.state_dict().keys()

    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is model_class
    assert_same_state_dict(model, loaded)
    pixel_values, mask = make_inputs(config)
    expected_outputs = outputs_of(model, kind, pixel_values, mask)
    for expected, actual in zip(expected_outputs, outputs_of(loaded, kind, pixel_values, mask), strict=True):
        assert torch.equal(expected, actual)

    loaded_config = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded_config) is SimMIMConfig
    expected_config, actual_config = model.config.to_dict(), loaded_config.to_dict()
    for key in ("transformers_version", "architectures", "auto_map", "dtype", "_name_or_path"):
        expected_config.pop(key, None)
        actual_config.pop(key, None)
    assert actual_config == expected_config


@pytest.mark.parametrize("preset", PRESETS)
def test_image_processor_round_trip(preset, tmp_path):
    config = SimMIMConfig.from_preset(preset)
    processor = SimMIMImageProcessor.from_model_config(config, crop_pct=0.875)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SimMIMImageProcessor
    assert loaded.to_dict() == processor.to_dict()
    assert (loaded.image_size, loaded.patch_size, loaded.mask_patch_size) == (32, config.patch_size, 8)
    assert loaded.crop_pct == 0.875
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (45, 60, 3), dtype=np.uint8))
    expected = processor(image, return_bool_masked_pos=True, mask_seed=3, return_tensors="pt")
    actual = loaded(image, return_bool_masked_pos=True, mask_seed=3, return_tensors="pt")
    assert torch.equal(expected["pixel_values"], actual["pixel_values"])
    assert torch.equal(expected["bool_masked_pos"], actual["bool_masked_pos"])
    assert actual["pixel_values"].shape == (1, 3, 32, 32)
    assert actual["bool_masked_pos"].shape == (1, config.grid_size, config.grid_size)


# ---------------------------------------------------------------------------------------------- masks and loss
@pytest.mark.parametrize("preset", PRESETS)
def test_mask_formats_give_the_same_loss(preset):
    config = SimMIMConfig.from_preset(preset)
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(config).eval()
    pixel_values, grid = make_inputs(config)
    b = grid.shape[0]
    variants = {
        "bool (B, h, w)": grid,
        "bool (B, L)": grid.reshape(b, -1),
        "int64 (B, h, w)": grid.long(),
        "int64 (B, L)": grid.reshape(b, -1).long(),
        "int32 (B, L)": grid.reshape(b, -1).int(),
        "uint8 (B, h, w)": grid.to(torch.uint8),
    }
    with torch.no_grad():
        losses = {name: model(pixel_values, bool_masked_pos=mask).loss for name, mask in variants.items()}
    reference = losses.pop("bool (B, h, w)")
    for name, loss in losses.items():
        assert torch.equal(loss, reference), name
    # ...and a different mask gives a different loss (the mask is really used).
    with torch.no_grad():
        other = model(pixel_values, bool_masked_pos=~grid).loss
    assert not torch.equal(other, reference)


@pytest.mark.parametrize("preset", PRESETS)
def test_loss_equals_hand_computation(preset):
    config = SimMIMConfig.from_preset(preset)
    torch.manual_seed(0)
    model = perturb_parameters_(SimMIMForMaskedImageModeling(config)).eval()
    pixel_values, grid = make_inputs(config)
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=grid)
    x = pixel_values.double().numpy()
    rec = out.reconstruction.double().numpy()
    m = pixel_mask(grid.numpy(), config.patch_size)
    expected = (np.abs(x - rec) * m).sum() / (m.sum() + 1e-5) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.loss.dim() == 0


def test_simmim_loss_ignores_unmasked_pixels():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    rec = torch.randn(2, 3, 16, 16, generator=generator)
    grid = torch.zeros(2, 4, 4, dtype=torch.bool)
    grid[0, 1, 2] = grid[0, 3, 0] = grid[1, 0, 0] = True
    m = torch.from_numpy(pixel_mask(grid.numpy(), 4)).bool().expand(-1, 3, -1, -1)
    loss = simmim_loss(x, rec, grid, patch_size=4)
    # Changing the target or the reconstruction where nothing is masked changes nothing...
    x2 = torch.where(m, x, torch.randn(x.shape, generator=generator) * 100)
    rec2 = torch.where(m, rec, torch.randn(x.shape, generator=generator) * 100)
    assert torch.equal(simmim_loss(x2, rec2, grid, patch_size=4), loss)
    # ...changing one masked pixel does.
    x3 = x.clone()
    x3[0, 1, 4, 8] += 1.0
    assert bool(m[0, 1, 4, 8])
    assert not torch.equal(simmim_loss(x3, rec, grid, patch_size=4), loss)
    # The value: mean absolute error over masked pixel-channels (up to the 1e-5 in the denominator).
    assert loss.item() == pytest.approx(F.l1_loss(rec[m], x[m]).item(), rel=1e-6)


@pytest.mark.parametrize(
    "loss_type, reference",
    [("l1", F.l1_loss), ("l2", F.mse_loss), ("smooth_l1", F.smooth_l1_loss)],
)
def test_loss_types_match_torch(loss_type, reference):
    config = SimMIMConfig.from_preset("vit-tiny-test", loss_type=loss_type)
    torch.manual_seed(0)
    model = perturb_parameters_(SimMIMForMaskedImageModeling(config), std=0.5).eval()
    pixel_values, grid = make_inputs(config)
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=grid)
    m = torch.from_numpy(pixel_mask(grid.numpy(), config.patch_size)).bool().expand(-1, 3, -1, -1)
    diff = (out.reconstruction - pixel_values)[m].abs()
    if loss_type == "smooth_l1":  # both branches of the Huber loss are exercised
        assert (diff < 1).any() and (diff > 1).any()
    expected = reference(out.reconstruction[m], pixel_values[m])
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=0)


def test_norm_target_normalises_each_patch():
    config = SimMIMConfig.from_preset("vit-tiny-test", norm_target=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=generator) * 3 + 1
    rec = torch.randn(2, 3, 32, 32, generator=generator)
    _, grid = make_inputs(config)
    p = config.patch_size
    patches = x.double().numpy().reshape(2, 3, 8, p, 8, p)
    mean = patches.mean(axis=(3, 5), keepdims=True)
    std = np.sqrt(patches.var(axis=(3, 5), keepdims=True) + 1e-6)
    target = ((patches - mean) / std).reshape(2, 3, 32, 32)
    m = pixel_mask(grid.numpy(), p)
    expected = (np.abs(target - rec.double().numpy()) * m).sum() / (m.sum() + 1e-5) / 3
    loss = simmim_loss(x, rec, grid, p, norm_target=True)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() != pytest.approx(simmim_loss(x, rec, grid, p).item(), rel=1e-2)


# ---------------------------------------------------------------------------------------------- mask tokens
def masked_pixels_replaced(pixel_values, grid, patch_size, seed=1):
    m = torch.from_numpy(pixel_mask(grid.numpy(), patch_size)).bool().expand_as(pixel_values)
    noise = torch.randn(pixel_values.shape, generator=torch.Generator().manual_seed(seed)) * 5
    return torch.where(m, noise, pixel_values)


def encode(model, pixel_values, grid, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model(pixel_values, bool_masked_pos=grid).last_hidden_state


@pytest.mark.parametrize("mask_token_type", ["learned", "zeros", "noise"])
@pytest.mark.parametrize("preset", PRESETS)
def test_encoder_ignores_pixels_under_the_mask(preset, mask_token_type):
    config = SimMIMConfig.from_preset(preset, mask_token_type=mask_token_type)
    torch.manual_seed(0)
    model = perturb_parameters_(SimMIMModel(config)).eval()
    assert (model.encoder.mask_token is not None) == (mask_token_type == "learned")
    pixel_values, grid = make_inputs(config)
    changed = masked_pixels_replaced(pixel_values, grid, config.patch_size)
    assert torch.equal(encode(model, pixel_values, grid, seed=0), encode(model, changed, grid, seed=0))
    # Without the mask, the same change does reach the output.
    assert not torch.equal(encode(model, pixel_values, None), encode(model, changed, None))


@pytest.mark.parametrize("preset", PRESETS)
def test_zeros_mask_token_is_a_zero_embedding_and_noise_is_random(preset):
    torch.manual_seed(0)
    learned = perturb_parameters_(SimMIMModel(SimMIMConfig.from_preset(preset))).eval()
    zeros = SimMIMModel(SimMIMConfig.from_preset(preset, mask_token_type="zeros")).eval()
    noise = SimMIMModel(SimMIMConfig.from_preset(preset, mask_token_type="noise")).eval()
    state = {k: v for k, v in learned.state_dict().items() if "mask_token" not in k}
    for model in (zeros, noise):
        assert model.load_state_dict(state, strict=True) is not None
    pixel_values, grid = make_inputs(learned.config)
    with torch.no_grad():
        learned.encoder.mask_token.zero_()
    # "zeros" is exactly a learned mask token that happens to be zero.
    assert torch.equal(encode(zeros, pixel_values, grid), encode(learned, pixel_values, grid))
    # "noise" draws fresh Gaussian noise for every call (reproducible under a seed).
    first, second = encode(noise, pixel_values, grid, seed=1), encode(noise, pixel_values, grid, seed=2)
    assert not torch.equal(first, second)
    assert torch.equal(first, encode(noise, pixel_values, grid, seed=1))
    assert not torch.equal(first, encode(zeros, pixel_values, grid))


# ---------------------------------------------------------------------------------------------- training mode
def loss_and_grads(model, pixel_values, grid):
    model.zero_grad(set_to_none=True)
    loss = model(pixel_values, bool_masked_pos=grid).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", PRESETS)
def test_gradient_checkpointing_gives_same_loss_and_gradients(preset):
    config = SimMIMConfig.from_preset(preset, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = perturb_parameters_(SimMIMForMaskedImageModeling(config)).train()
    pixel_values, grid = make_inputs(config)
    loss, grads = loss_and_grads(model, pixel_values, grid)
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}

    calls = []
    blocks = model.simmim.encoder.blocks if config.backbone == "vit" else model.simmim.encoder.layers[0].blocks
    # Module hooks sit outside the checkpoint; a submodule's forward starts again inside the recomputation.
    handle = blocks[0].norm1.register_forward_pre_hook(lambda *args: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    assert blocks[0].gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(model, pixel_values, grid)
    handle.remove()
    assert len(calls) == 2, "a checkpointed block runs again in the backward pass"
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=0)
    assert ckpt_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_drop_path_function():
    x = torch.ones(4000, 3)
    torch.manual_seed(0)
    out = drop_path(x, 0.25, training=True)
    kept = out[:, 0] != 0
    # Whole samples are dropped, survivors are rescaled by 1 / (1 - p).
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / 0.75))
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    assert abs((~kept).float().mean().item() - 0.25) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    assert torch.equal(drop_path(x, 0.0, training=True), x)


@pytest.mark.parametrize("preset", PRESETS)
def test_drop_path_active_only_in_train_mode(preset):
    torch.manual_seed(0)
    model = perturb_parameters_(SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset, drop_path_rate=0.5)))
    plain = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset, drop_path_rate=0.0))
    plain.load_state_dict(model.state_dict())
    pixel_values, grid = make_inputs(model.config, batch=4)

    def run(m, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return m(pixel_values, bool_masked_pos=grid).reconstruction

    model.eval(), plain.eval()
    assert torch.equal(run(model, 0), run(model, 1))
    assert torch.equal(run(model, 0), run(plain, 0))
    model.train(), plain.train()
    assert not torch.equal(run(model, 0), run(model, 1))
    assert torch.equal(run(model, 0), run(model, 0))
    assert torch.equal(run(plain, 0), run(plain, 1))


# ---------------------------------------------------------------------------------------------- shapes
def test_vit_output_shapes():
    config = SimMIMConfig.from_preset("vit-tiny-test")  # 32 px, patch 4, width 64, 2 layers
    model = SimMIMModel(config).eval()
    pixel_values, grid = make_inputs(config, batch=3)
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=grid, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 1 + 64, 64)
    assert out.pooler_output.shape == (3, 64)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (3, 65, 64) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    # Without mean pooling the pooler averages the (normalised) patch tokens, CLS excluded.
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 1:].mean(dim=1))
    mim = SimMIMForMaskedImageModeling(config).eval()
    with torch.no_grad():
        mim_out = mim(pixel_values, bool_masked_pos=grid, output_hidden_states=True)
    assert mim_out.reconstruction.shape == pixel_values.shape
    assert len(mim_out.hidden_states) == 3
    with torch.no_grad():
        no_mask = mim(pixel_values)
    assert no_mask.loss is None and no_mask.reconstruction.shape == pixel_values.shape


def test_swin_output_shapes():
    config = SimMIMConfig.from_preset("swin-tiny-test")  # 32 px, patch 2, embed 16, depths [2, 2]
    model = SimMIMModel(config).eval()
    pixel_values, grid = make_inputs(config, batch=3)
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=grid, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 8 * 8, 32)
    assert out.pooler_output.shape == (3, 32)
    assert [tuple(h.shape) for h in out.hidden_states] == [(3, 256, 16), (3, 64, 32), (3, 64, 32)]
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=1))
    tuple_out = model(pixel_values, return_dict=False)
    assert isinstance(tuple_out, tuple) and tuple_out[0].shape == (3, 64, 32)


# ---------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("preset", PRESETS)
def test_classification_from_pretraining_checkpoint(preset, tmp_path):
    config = SimMIMConfig.from_preset(preset)
    torch.manual_seed(0)
    pretrained = perturb_parameters_(SimMIMForMaskedImageModeling(config))
    pretrained.save_pretrained(tmp_path)
    model, info = SimMIMForImageClassification.from_pretrained(tmp_path, num_labels=10, output_loading_info=True)
    expected_missing = {"classifier.weight", "classifier.bias"}
    if config.backbone == "vit":
        expected_missing |= {"simmim.pooler.fc_norm.weight", "simmim.pooler.fc_norm.bias"}
    assert set(info["missing_keys"]) == expected_missing
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.simmim.encoder.mask_token is None
    assert not any(k.startswith("decoder.") for k in model.state_dict())
    source = pretrained.state_dict()
    loaded_encoder = {k: v for k, v in model.state_dict().items() if k.startswith("simmim.encoder.")}
    assert loaded_encoder
    for key, value in loaded_encoder.items():
        assert torch.equal(value, source[key]), key

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pixel_values, _ = make_inputs(config, batch=4)
    labels = torch.tensor([0, 3, 9, 3])
    out = model(pixel_values, labels=labels)
    assert out.logits.shape == (4, 10)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    before = model.classifier.weight.detach().clone()
    out.loss.backward()
    assert model.simmim.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    optimizer.step()
    assert torch.isfinite(out.loss)
    assert not torch.equal(model.classifier.weight, before)


def test_classification_model_leaves_the_callers_config_alone():
    """The ViT classifier pools with fc_norm (use_mean_pooling); building it must not switch a shared config, or a
    pretraining model built from the same config afterwards would lose its final norm."""
    config = SimMIMConfig.from_preset("vit-tiny-test")
    classifier = SimMIMForImageClassification(config)
    assert classifier.config.use_mean_pooling and classifier.simmim.pooler.fc_norm is not None
    assert config.use_mean_pooling is False
    assert isinstance(SimMIMForMaskedImageModeling(config).simmim.encoder.norm, torch.nn.LayerNorm)


def test_auto_model_loads_encoder_from_pretraining_checkpoint(tmp_path):
    config = SimMIMConfig.from_preset("swin-tiny-test")
    torch.manual_seed(0)
    pretrained = perturb_parameters_(SimMIMForMaskedImageModeling(config)).eval()
    pretrained.save_pretrained(tmp_path)
    model, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model) is SimMIMModel
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixel_values, grid = make_inputs(config)
    with torch.no_grad():
        expected = pretrained.simmim(pixel_values, bool_masked_pos=grid).last_hidden_state
        assert torch.equal(model.eval()(pixel_values, bool_masked_pos=grid).last_hidden_state, expected)


# ---------------------------------------------------------------------------------------------- Trainer
def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_trainer_trains_masked_image_modeling(tmp_path):
    import datasets
    from transformers import Trainer, TrainingArguments

    from hf_simmim.data.transforms import SimMIMTransform, collate_fn

    rng = np.random.RandomState(0)
    images = [png_bytes(rng.randint(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(12)]
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    config = SimMIMConfig.from_preset("vit-tiny-test")
    processor = SimMIMImageProcessor.from_model_config(config)
    train = dataset.with_transform(SimMIMTransform(processor, train=True))
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate_fn)
    result = trainer.train()
    assert result.global_step == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert np.isfinite(result.training_loss)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "decoder.0.weight" in changed and "simmim.encoder.mask_token" in changed
    assert "simmim.encoder.blocks.0.attn.qkv.weight" in changed


# ---------------------------------------------------------------------------------------------- trust_remote_code
REMOTE_SCRIPT = textwrap.dedent(
    r"""
    import importlib.abc, json, sys

    class BlockHfSimmim(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_simmim" or name.startswith("hf_simmim."):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockHfSimmim())
    try:
        import hf_simmim  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_simmim is importable: the test would prove nothing")

    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import (
        AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, AutoModelForMaskedImageModeling,
    )

    folder, inputs_path, image_path = sys.argv[1:4]
    inputs = load_file(inputs_path)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    mim = AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    classifier = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, num_labels=3)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        loss = mim(inputs["pixel_values"], bool_masked_pos=inputs["bool_masked_pos"]).loss
        hidden = base(inputs["pixel_values"], bool_masked_pos=inputs["bool_masked_pos"]).last_hidden_state
    pixel_values = processor(Image.open(image_path), return_tensors="pt")["pixel_values"]
    print(json.dumps({
        "loss": loss.item(),
        "hidden_sum": hidden.double().sum().item(),
        "pixel_values": pixel_values.flatten().tolist(),
        "classes": [type(x).__module__ + "." + type(x).__name__ for x in (config, mim, base, classifier, processor)],
        "hf_simmim_loaded": any(name.split(".")[0] == "hf_simmim" for name in sys.modules),
    }))
    """
)


def test_trust_remote_code_without_hf_simmim(tmp_path):
    config = SimMIMConfig.from_preset("vit-tiny-test")
    torch.manual_seed(0)
    model = perturb_parameters_(SimMIMForMaskedImageModeling(config)).eval()
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor = SimMIMImageProcessor.from_model_config(config)
    processor.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert {"AutoConfig", "AutoModel", "AutoModelForMaskedImageModeling", "AutoModelForImageClassification"} <= set(
        saved["auto_map"]
    )
    assert "AutoImageProcessor" in json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]

    pixel_values, grid = make_inputs(config)
    save_file({"pixel_values": pixel_values, "bool_masked_pos": grid}, tmp_path / "inputs.safetensors")
    image = Image.fromarray(np.random.RandomState(1).randint(0, 256, (40, 50, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    with torch.no_grad():
        expected_loss = model(pixel_values, bool_masked_pos=grid).loss.item()
        expected_hidden = model.simmim(pixel_values, bool_masked_pos=grid).last_hidden_state.double().sum().item()
    expected_pixels = processor(Image.open(tmp_path / "image.png"), return_tensors="pt")["pixel_values"].flatten()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONNOUSERSITE="1")
    arguments = [str(folder), str(tmp_path / "inputs.safetensors"), str(tmp_path / "image.png")]
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["hf_simmim_loaded"]
    assert all(name.startswith("transformers_modules.") for name in report["classes"]), report["classes"]
    assert [name.rsplit(".", 1)[1] for name in report["classes"]] == [
        "SimMIMConfig",
        "SimMIMForMaskedImageModeling",
        "SimMIMModel",
        "SimMIMForImageClassification",
        "SimMIMImageProcessor",
    ]
    assert report["loss"] == pytest.approx(expected_loss, abs=1e-6)
    assert report["hidden_sum"] == pytest.approx(expected_hidden, abs=1e-4)
    torch.testing.assert_close(torch.tensor(report["pixel_values"]), expected_pixels, rtol=0, atol=1e-6)
