"""SwinV2 parity with the official SimMIM code of microsoft/Swin-Transformer, through its reference fixtures
(`../shared/fixtures/official_simmim_v2/README.md`): both fixtures (raw target and normalised target) convert from
the official checkpoint with no hand-written config and reproduce the official loss, reconstruction and encoder
features within 1e-5; the released weights' `rpe_mlp` spelling converts too; the buffers we compute equal the
official ones."""

import numpy as np
import pytest
import torch
from conftest import SHARED_DIR, max_abs_diff, require_shared_dir
from test_official_parity import assert_matches_official, load_fixture

from hf_simmim import SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from hf_simmim.cli import main as cli_main
from hf_simmim.convert import convert_official_checkpoint, load_official_checkpoint
from hf_simmim.models.modeling_simmim import normalize_locally

FIXTURES = ("swinv2", "swinv2_normtarget")
# What the checkpoints cannot tell (they are byte-identical): the target of the normalised-target fixture.
TARGET_OF = {"swinv2": {}, "swinv2_normtarget": {"norm_target": "local", "norm_target_patch_size": 47}}


@pytest.fixture(scope="module")
def v2_dir():
    return require_shared_dir(SHARED_DIR / "fixtures" / "official_simmim_v2", "official SimMIM SwinV2 fixtures")


def expected_architecture(fixture_config):
    """Our config fields the official constructor arguments imply (the fixture's config.json)."""
    kw = fixture_config["encoder"]["kwargs"]
    wrapper = fixture_config["wrapper"]
    return dict(
        backbone="swinv2",
        image_size=kw["img_size"],
        patch_size=kw["patch_size"],
        num_channels=kw["in_chans"],
        embed_dim=kw["embed_dim"],
        depths=kw["depths"],
        num_heads=kw["num_heads"],
        window_size=kw["window_size"],
        mlp_ratio=kw["mlp_ratio"],
        qkv_bias=kw["qkv_bias"],
        use_absolute_position_embeddings=kw["ape"],
        patch_norm=kw["patch_norm"],
        layer_norm_eps=kw["norm_layer"]["eps"],
        pretrained_window_sizes=kw["pretrained_window_sizes"]["value"],
        encoder_stride=wrapper["kwargs"]["encoder_stride"],
        hidden_size=wrapper["derived"]["encoder_num_features"],
    )


def assert_target_setting(config, fixture_config):
    norm_target = fixture_config["wrapper"]["kwargs"]["config"]["NORM_TARGET"]
    assert config.norm_target == ("local" if norm_target["ENABLE"] else None)
    if norm_target["ENABLE"]:
        assert config.norm_target_patch_size == norm_target["PATCH_SIZE"]


def official_state_dict(v2_dir):
    return torch.load(v2_dir / "swinv2" / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]


# ---------------------------------------------------------------------------------------------- the fixtures
@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_official_checkpoint_converts_and_reproduces_the_official_outputs(v2_dir, name, attn_implementation):
    folder, fixture_config, inputs, outputs = load_fixture(v2_dir, name)
    model = convert_official_checkpoint(str(folder / "checkpoint.pth"), **TARGET_OF[name])
    model.set_attn_implementation(attn_implementation)
    config = model.config
    expected = expected_architecture(fixture_config)
    assert {key: getattr(config, key) for key in expected} == expected
    assert_target_setting(config, fixture_config)
    # the two fixtures' losses differ by 2.4e-4: the 1e-5 check tells the targets apart
    assert_matches_official(model, inputs, outputs, f"{name} ({attn_implementation})")


def test_the_normalised_target_is_the_official_one(v2_dir):
    _, _, inputs, outputs = load_fixture(v2_dir, "swinv2_normtarget")
    target = normalize_locally(inputs["pixel_values"], 47)
    diff = max_abs_diff(target, outputs["target"])
    print(f"[parity] official swinv2 normalised target: max abs diff {diff:.3g}")
    assert diff <= 1e-5
    assert max_abs_diff(target, inputs["pixel_values"]) > 0.1  # the premise: the target is not the input


def test_cli_converts_without_a_config(v2_dir, tmp_path, capsys):
    from transformers import AutoModelForMaskedImageModeling

    folder, fixture_config, inputs, outputs = load_fixture(v2_dir, "swinv2")
    out_dir = tmp_path / "converted"
    assert cli_main(["convert", "official", str(folder / "checkpoint.pth"), str(out_dir)]) == 0
    assert str(out_dir) in capsys.readouterr().out
    model = AutoModelForMaskedImageModeling.from_pretrained(out_dir)
    assert isinstance(model, SimMIMForMaskedImageModeling) and model.config.backbone == "swinv2"
    assert_matches_official(model, inputs, outputs, "swinv2 (cli)")


def test_cli_converts_the_normalised_target_fixture_with_norm_target(v2_dir, tmp_path):
    folder, _, inputs, outputs = load_fixture(v2_dir, "swinv2_normtarget")
    out_dir = tmp_path / "converted"
    argv = ["convert", "official", str(folder / "checkpoint.pth"), str(out_dir), "--norm_target", "local"]
    assert cli_main(argv) == 0
    model = SimMIMForMaskedImageModeling.from_pretrained(out_dir)
    assert_matches_official(model, inputs, outputs, "swinv2_normtarget (cli)")


def test_derived_buffers_equal_the_official_ones(v2_dir):
    """Our coordinate tables, relative position indices and shift masks are computed, not loaded: every one of the
    18 buffers the official checkpoint stores must equal ours, including stage 3's window clamped to 2."""
    state_dict = official_state_dict(v2_dir)
    model = convert_official_checkpoint(str(v2_dir / "swinv2" / "checkpoint.pth"))
    ours = dict(model.named_buffers())
    checked = 0
    for key, official in state_dict.items():
        if key.endswith(("relative_coords_table", "relative_position_index", "attn_mask")):
            torch.testing.assert_close(ours["simmim." + key].to(official.dtype), official, rtol=0, atol=0)
            checked += 1
    assert checked == 18
    assert ours["simmim.encoder.layers.3.blocks.0.attn.relative_coords_table"].shape == (1, 3, 3, 2)


def test_mask_generator_replays_the_official_masks(v2_dir):
    _, fixture_config, inputs, _ = load_fixture(v2_dir, "swinv2")
    generator = SimMIMMaskGenerator(**fixture_config["mask_generator"]["kwargs"])
    rng = np.random.RandomState(0)
    masks = np.stack([generator(rng=rng), generator(rng=rng)]).astype(np.int64)
    np.testing.assert_array_equal(masks, inputs["mask"].numpy())


# ---------------------------------------------------------------------------------------------- checkpoint variants
def test_released_rpe_mlp_spelling_converts(v2_dir, tmp_path):
    """The released SimMIM SwinV2 weights name the position-bias MLP `rpe_mlp` (Swin-Transformer issue 271)."""
    _, _, inputs, outputs = load_fixture(v2_dir, "swinv2")
    renamed = {key.replace(".cpb_mlp.", ".rpe_mlp."): value for key, value in official_state_dict(v2_dir).items()}
    assert sum(".rpe_mlp." in key for key in renamed) == 24
    path = tmp_path / "released.pth"
    torch.save({"model": renamed}, path)
    model = convert_official_checkpoint(str(path))
    assert model.config.backbone == "swinv2"
    assert_matches_official(model, inputs, outputs, "swinv2 (rpe_mlp keys)")


def test_without_buffers_the_window_is_asked_for(v2_dir, tmp_path):
    _, _, inputs, outputs = load_fixture(v2_dir, "swinv2")
    derived = ("relative_coords_table", "relative_position_index", "attn_mask")
    stripped = {k: v for k, v in official_state_dict(v2_dir).items() if not k.endswith(derived)}
    path = tmp_path / "stripped.pth"
    torch.save({"model": stripped}, path)
    with pytest.raises(ValueError, match="window_size"):
        convert_official_checkpoint(str(path))
    model = convert_official_checkpoint(str(path), window_size=4, image_size=64)
    assert_matches_official(model, inputs, outputs, "swinv2 (buffers stripped, window_size and image_size given)")


def test_a_geometry_the_checkpoint_does_not_have_is_refused(v2_dir):
    """At 128 px the shift masks and the clamped stage-3 window differ from the stored buffers: refused, naming them."""
    with pytest.raises(ValueError, match="image_size=128"):
        convert_official_checkpoint(str(v2_dir / "swinv2" / "checkpoint.pth"), image_size=128)


def test_a_training_checkpoints_config_gives_the_normalised_target(v2_dir, tmp_path):
    """An official training checkpoint carries its yacs config (a dict): MODEL.SIMMIM.NORM_TARGET and the mask
    settings come from it."""
    _, _, inputs, outputs = load_fixture(v2_dir, "swinv2_normtarget")
    config = {
        "MODEL": {"TYPE": "swinv2", "SIMMIM": {"NORM_TARGET": {"ENABLE": True, "PATCH_SIZE": 47}}},
        "DATA": {"MASK_PATCH_SIZE": 16, "MASK_RATIO": 0.6},
    }
    path = tmp_path / "training.pth"
    torch.save({"model": official_state_dict(v2_dir), "config": config, "epoch": 3}, path)
    state_dict, official_config = load_official_checkpoint(str(path))  # weights_only: a plain dict loads
    assert official_config == config and len(state_dict) == 172
    model = convert_official_checkpoint(str(path))
    assert (model.config.norm_target, model.config.norm_target_patch_size) == ("local", 47)
    assert model.config.mask_patch_size == 16
    assert_matches_official(model, inputs, outputs, "swinv2_normtarget (target from the training config)")

