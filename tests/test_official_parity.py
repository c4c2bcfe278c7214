"""Parity with the official microsoft/SimMIM code, through its reference fixtures (see
`../shared/fixtures/official_simmim/README.md`): converted checkpoints reproduce the official loss, reconstruction
and encoder features; the mask generator replays the official masks; official-layout variants round-trip."""

import json

import numpy as np
import pytest
import torch
from conftest import max_abs_diff, perturb_parameters_, require_shared_dir, tiny_swin, tiny_vit
from safetensors.torch import load_file

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from hf_simmim.cli import main as cli_main
from hf_simmim.convert import UnsafeCheckpointError, convert_official_checkpoint, load_official_checkpoint
from hf_simmim.models.modeling_swin import swin_relative_position_index, swin_shift_attention_mask
from hf_simmim.models.modeling_vit import vit_relative_position_index

ATOL = 1e-5
FIXTURES = ("vit", "swin")


class TrainingConfig:
    """Stands in for the yacs config an official training checkpoint pickles (a custom class instance)."""

    def __init__(self):
        self.DATA = {"MASK_PATCH_SIZE": 16, "MASK_RATIO": 0.5}


def load_fixture(fixtures_dir, name):
    folder = fixtures_dir / name
    with open(folder / "config.json") as f:
        config = json.load(f)
    return folder, config, load_file(folder / "inputs.safetensors"), load_file(folder / "outputs.safetensors")


def run_model(model, inputs):
    """loss, reconstruction and the encoder feature map for the fixture's pixel_values and mask."""
    model.eval()
    pixel_values, mask = inputs["pixel_values"], inputs["mask"]
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=mask)
        sequence = model.simmim(pixel_values, bool_masked_pos=mask).last_hidden_state
        features = model.simmim.encoder.feature_map(sequence)
    return out.loss, out.reconstruction, features


def assert_matches_official(model, inputs, outputs, label):
    loss, reconstruction, features = run_model(model, inputs)
    assert reconstruction.shape == outputs["reconstruction"].shape
    assert features.shape == outputs["encoder_features"].shape
    diffs = {
        "loss": max_abs_diff(loss, outputs["loss"]),
        "reconstruction": max_abs_diff(reconstruction, outputs["reconstruction"]),
        "encoder_features": max_abs_diff(features, outputs["encoder_features"]),
    }
    print(f"[parity] official {label}: max abs diff " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    for key, diff in diffs.items():
        assert diff <= ATOL, f"{label}: {key} differs from the official output by {diff}"


def expected_architecture(fixture_config):
    """The SimMIMConfig fields the official constructor arguments imply (read from the fixture's config.json)."""
    kw = fixture_config["encoder"]["kwargs"]
    arch = dict(
        image_size=kw["img_size"],
        patch_size=kw["patch_size"],
        num_channels=kw["in_chans"],
        mlp_ratio=kw["mlp_ratio"],
        qkv_bias=kw["qkv_bias"],
        layer_norm_eps=kw["norm_layer"]["eps"],
        encoder_stride=fixture_config["wrapper"]["kwargs"]["encoder_stride"],
        hidden_size=fixture_config["wrapper"]["derived"]["encoder_num_features"],
    )
    if fixture_config["fixture"] == "vit":
        arch.update(
            backbone="vit",
            num_hidden_layers=kw["depth"],
            num_attention_heads=kw["num_heads"],
            layer_scale_init_value=kw["init_values"],
            use_absolute_position_embeddings=kw["use_abs_pos_emb"],
            use_relative_position_bias=kw["use_rel_pos_bias"],
            use_shared_relative_position_bias=kw["use_shared_rel_pos_bias"],
            use_mean_pooling=kw["use_mean_pooling"],
        )
        assert arch["hidden_size"] == kw["embed_dim"]
    else:
        arch.update(
            backbone="swin",
            embed_dim=kw["embed_dim"],
            depths=kw["depths"],
            num_heads=kw["num_heads"],
            window_size=kw["window_size"],
            use_absolute_position_embeddings=kw["ape"],
            patch_norm=kw["patch_norm"],
        )
    mask_kw = fixture_config["mask_generator"]["kwargs"]
    arch.update(mask_patch_size=mask_kw["mask_patch_size"], mask_ratio=mask_kw["mask_ratio"])
    return arch


def assert_architecture(config, expected):
    actual = {key: getattr(config, key) for key in expected}
    assert actual == expected


# ---------------------------------------------------------------------------------------------- the fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_convert_official_checkpoint_python_api(official_fixtures_dir, name):
    folder, fixture_config, inputs, outputs = load_fixture(official_fixtures_dir, name)
    model = convert_official_checkpoint(str(folder / "checkpoint.pth"))
    assert isinstance(model, SimMIMForMaskedImageModeling)
    assert_architecture(model.config, expected_architecture(fixture_config))
    assert_matches_official(model, inputs, outputs, f"{name} (python api)")


@pytest.mark.parametrize("name", FIXTURES)
def test_convert_official_checkpoint_cli(official_fixtures_dir, name, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModelForMaskedImageModeling

    folder, fixture_config, inputs, outputs = load_fixture(official_fixtures_dir, name)
    out_dir = tmp_path / "converted"
    assert cli_main(["convert", "official", str(folder / "checkpoint.pth"), str(out_dir)]) == 0
    assert str(out_dir) in capsys.readouterr().out
    assert (out_dir / "model.safetensors").is_file()
    model = AutoModelForMaskedImageModeling.from_pretrained(out_dir)
    assert isinstance(model, SimMIMForMaskedImageModeling)
    assert_architecture(model.config, expected_architecture(fixture_config))
    assert_matches_official(model, inputs, outputs, f"{name} (cli)")
    # The saved preprocessing fits the model it was saved with.
    processor = AutoImageProcessor.from_pretrained(out_dir)
    assert processor.image_size == fixture_config["encoder"]["kwargs"]["img_size"]
    assert processor.patch_size == fixture_config["encoder"]["kwargs"]["patch_size"]


@pytest.mark.parametrize("name", FIXTURES)
def test_mask_generator_replays_official_masks(official_fixtures_dir, name):
    """The fixture masks came from two calls of the official MaskGenerator after np.random.seed(0)."""
    _, fixture_config, inputs, _ = load_fixture(official_fixtures_dir, name)
    generator = SimMIMMaskGenerator(**fixture_config["mask_generator"]["kwargs"])
    derived = fixture_config["mask_generator"]["derived"]
    assert (generator.rand_size, generator.scale, generator.token_count, generator.mask_count) == (
        derived["rand_size"],
        derived["scale"],
        derived["token_count"],
        derived["mask_count"],
    )
    rng = np.random.RandomState(0)
    masks = np.stack([generator(rng=rng), generator(rng=rng)]).astype(np.int64)
    np.testing.assert_array_equal(masks, inputs["mask"].numpy())


@pytest.mark.parametrize("name", FIXTURES)
def test_derived_buffers_equal_the_official_ones(official_fixtures_dir, name):
    """Our relative position indices and Swin shift masks are computed, not loaded: they must equal the buffers
    the official code stored."""
    state_dict, _ = load_official_checkpoint(str(official_fixtures_dir / name / "checkpoint.pth"))
    model = convert_official_checkpoint(str(official_fixtures_dir / name / "checkpoint.pth"))
    ours = dict(model.named_buffers())
    checked = 0
    for key, official in state_dict.items():
        if not key.endswith(("relative_position_index", "attn_mask")):
            continue
        torch.testing.assert_close(ours["simmim." + key].to(official.dtype), official, rtol=0, atol=0)
        checked += 1
    assert checked == (1 if name == "vit" else 11)
    if name == "vit":
        torch.testing.assert_close(
            vit_relative_position_index(8), state_dict["encoder.rel_pos_bias.relative_position_index"], rtol=0, atol=0
        )
    else:
        torch.testing.assert_close(
            swin_relative_position_index(4),
            state_dict["encoder.layers.0.blocks.0.attn.relative_position_index"],
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(
            swin_shift_attention_mask((32, 32), 4, 2), state_dict["encoder.layers.0.blocks.1.attn_mask"], rtol=0, atol=0
        )


def test_missing_fixtures_fail_under_ci_and_skip_elsewhere(tmp_path, monkeypatch):
    missing = tmp_path / "absent"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must not skip"):
        require_shared_dir(missing, "official SimMIM fixtures")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="absent"):
        require_shared_dir(missing, "official SimMIM fixtures")
    assert require_shared_dir(tmp_path, "official SimMIM fixtures") == tmp_path


# ---------------------------------------------------------------------------------------------- checkpoint files
def test_unsafe_pickle_refused_by_default_and_converts_when_allowed(official_fixtures_dir, tmp_path, capsys):
    folder, _, inputs, outputs = load_fixture(official_fixtures_dir, "vit")
    state_dict = torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    path = tmp_path / "training_checkpoint.pth"
    torch.save(
        {
            "model": state_dict,
            "config": TrainingConfig(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]},
            "epoch": 7,
        },
        path,
    )
    with pytest.raises(UnsafeCheckpointError, match="--allow-unsafe-pickle"):
        convert_official_checkpoint(str(path))
    # The CLI reports the same refusal as an error, with the flag to pass, and writes nothing.
    out_dir = tmp_path / "cli"
    assert cli_main(["convert", "official", str(path), str(out_dir)]) == 2
    assert "--allow-unsafe-pickle" in capsys.readouterr().err
    assert not (out_dir / "model.safetensors").exists()

    model = convert_official_checkpoint(str(path), allow_unsafe_pickle=True)
    assert_matches_official(model, inputs, outputs, "vit (unsafe pickle allowed)")
    # The mask settings of the pickled training config are carried over.
    assert (model.config.mask_patch_size, model.config.mask_ratio) == (16, 0.5)

    assert cli_main(["convert", "official", str(path), str(out_dir), "--allow-unsafe-pickle"]) == 0
    assert_matches_official(
        SimMIMForMaskedImageModeling.from_pretrained(out_dir), inputs, outputs, "vit (cli, unsafe pickle allowed)"
    )


def test_checkpoint_with_plain_extra_values_loads_with_weights_only(official_fixtures_dir, tmp_path):
    folder, _, inputs, outputs = load_fixture(official_fixtures_dir, "vit")
    state_dict = torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    path = tmp_path / "plain.pth"
    torch.save({"model": state_dict, "epoch": 3}, path)
    torch.load(path, weights_only=True)  # the premise: a weights_only load accepts it
    model = convert_official_checkpoint(str(path))  # no allow_unsafe_pickle
    assert_matches_official(model, inputs, outputs, "vit ({'model', 'epoch'})")


def test_image_size_override_when_the_checkpoint_cannot_tell(official_fixtures_dir, tmp_path, capsys):
    """Without the shift-mask buffers, the Swin fixture's weights do not tell its image size (every table is
    4x4-window sized): conversion asks for it, and --image_size supplies it."""
    folder, _, inputs, outputs = load_fixture(official_fixtures_dir, "swin")
    state_dict = torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    stripped = {k: v for k, v in state_dict.items() if not k.endswith(("attn_mask", "relative_position_index"))}
    path = tmp_path / "stripped.pth"
    torch.save({"model": stripped}, path)
    with pytest.raises(ValueError, match="image_size"):
        convert_official_checkpoint(str(path))
    out_dir = tmp_path / "converted"
    assert cli_main(["convert", "official", str(path), str(out_dir), "--image_size", "128"]) == 0
    assert_matches_official(
        SimMIMForMaskedImageModeling.from_pretrained(out_dir), inputs, outputs, "swin (buffers stripped, --image_size)"
    )


def test_missing_checkpoint_and_non_simmim_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_official_checkpoint(str(tmp_path / "nope.pth"))
    path = tmp_path / "other.pth"
    torch.save({"model": {"backbone.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="encoder"):
        convert_official_checkpoint(str(path))


# ---------------------------------------------------------------------------------------------- layout variants
def to_official_state_dict(model):
    """Write our model's weights with the official key names, by hand: drop the `simmim.` prefix, split the
    fused ViT qkv bias into q_bias / v_bias (the official attention has no key bias), move per-block relative
    position tables to `blocks.i.attn.relative_position_bias_table`, and add the buffers the official code
    saves (relative position indices, Swin shift masks)."""
    out = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("simmim.")
        if model.config.backbone == "vit" and key.endswith("attn.qkv.bias"):
            q, k, v = value.chunk(3)
            assert torch.count_nonzero(k) == 0, "the official layout cannot hold a key bias"
            stem = key[: -len("qkv.bias")]
            out[stem + "q_bias"], out[stem + "v_bias"] = q.clone(), v.clone()
            continue
        if key.startswith("encoder.blocks.") and ".rel_pos_bias." in key:
            key = key.replace(".rel_pos_bias.", ".attn.")
        out[key] = value.clone()
    for name, buffer in model.named_buffers():
        if buffer is None:
            continue
        name = name.removeprefix("simmim.")
        if name.startswith("encoder.blocks.") and ".rel_pos_bias." in name:
            name = name.replace(".rel_pos_bias.", ".attn.")
        out[name] = buffer.clone()
    return out


def zero_key_bias_(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("attn.qkv.bias") and model.config.backbone == "vit":
                dim = param.shape[0] // 3
                param[dim : 2 * dim] = 0
    return model


VARIANTS = {
    "vit-per-block-rpb": tiny_vit(
        use_relative_position_bias=True, use_shared_relative_position_bias=False, layer_scale_init_value=0.1
    ),
    "vit-abs-pos-and-shared-rpb": tiny_vit(
        use_absolute_position_embeddings=True,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=0.1,
    ),
    "vit-abs-pos-only": tiny_vit(
        use_absolute_position_embeddings=True,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=0.0,
    ),
    "swin-ape": tiny_swin(use_absolute_position_embeddings=True),
}
ARCHITECTURE_FIELDS = (
    "backbone",
    "image_size",
    "patch_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "mlp_ratio",
    "qkv_bias",
    "layer_norm_eps",
    "use_absolute_position_embeddings",
    "use_relative_position_bias",
    "use_shared_relative_position_bias",
    "use_mean_pooling",
    "patch_norm",
    "encoder_stride",
)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_official_layout_variants_round_trip(variant, tmp_path):
    config = SimMIMConfig(**VARIANTS[variant])
    torch.manual_seed(0)
    source = zero_key_bias_(perturb_parameters_(SimMIMForMaskedImageModeling(config))).eval()
    official = to_official_state_dict(source)
    if variant == "vit-per-block-rpb":
        assert "encoder.blocks.1.attn.relative_position_bias_table" in official
        assert "encoder.rel_pos_bias.relative_position_bias_table" not in official
    if variant.startswith("vit-abs") or variant == "swin-ape":
        assert any(k in official for k in ("encoder.pos_embed", "encoder.absolute_pos_embed"))
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": official}, path)

    # Without a relative position table the checkpoint cannot tell the number of heads: pass it.
    overrides = {"num_attention_heads": 2} if variant == "vit-abs-pos-only" else {}
    converted = convert_official_checkpoint(str(path), mask_patch_size=8, **overrides).eval()
    for field in ARCHITECTURE_FIELDS:
        if config.backbone == "swin" and field in ("num_hidden_layers", "num_attention_heads"):
            continue
        if config.backbone == "vit" and field in ("embed_dim", "depths", "num_heads", "window_size", "patch_norm"):
            continue
        assert getattr(converted.config, field) == getattr(config, field), field
    assert bool(converted.config.layer_scale_init_value) == bool(config.layer_scale_init_value)

    ours = source.state_dict()
    theirs = converted.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    mask = torch.stack([torch.from_numpy(SimMIMMaskGenerator.from_config(config, seed=s)()) for s in (0, 1)])
    with torch.no_grad():
        expected = source(pixel_values, bool_masked_pos=mask)
        actual = converted(pixel_values, bool_masked_pos=mask)
    diff = max_abs_diff(actual.reconstruction, expected.reconstruction)
    print(f"[parity] official variant {variant}: reconstruction max abs diff {diff:.3g}")
    assert diff <= ATOL
    assert abs(actual.loss.item() - expected.loss.item()) <= ATOL


def test_vit_key_bias_is_dropped_without_changing_the_function(tmp_path):
    """The official ViT has q and v biases only. Our fused qkv may hold a key bias; writing the checkpoint in the
    official layout drops it, which leaves the attention unchanged (it shifts all logits of a query equally)."""
    config = SimMIMConfig(**VARIANTS["vit-per-block-rpb"])
    torch.manual_seed(0)
    source = perturb_parameters_(SimMIMForMaskedImageModeling(config)).eval()
    reference = SimMIMForMaskedImageModeling(config)
    reference.load_state_dict(source.state_dict())
    zero_key_bias_(reference).eval()
    key_bias = source.simmim.encoder.blocks[0].attn.qkv.bias[32:64]
    assert key_bias.abs().min() > 0
    pixel_values = torch.randn(2, 3, 32, 32)
    mask = torch.from_numpy(np.stack([SimMIMMaskGenerator.from_config(config, seed=s)() for s in (0, 1)]))
    with torch.no_grad():
        expected = reference(pixel_values, mask).reconstruction
        assert max_abs_diff(source(pixel_values, mask).reconstruction, expected) <= ATOL
