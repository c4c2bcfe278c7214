"""Initialisation as the official microsoft/SimMIM code, parameter by parameter, against the statistics recorded by
building the official models (`../shared/fixtures/official_recipe/init_stats_{vit,swin}.json`, see its README,
"Initialisation statistics"): constants exactly, random tensors by distribution family, bounds and std."""

import json
import math
import re

import pytest
import torch
from test_official_parity import expected_architecture

from hf_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling

SEEDS = range(5)  # as the oracle: one model per seed, statistics pooled over the seeds
STD_TOLERANCE = 0.10
MIN_NUMEL_FOR_STD = 500  # below this a single tensor's std is too noisy to compare; its group is compared instead

# Official fine-tuning config fields (the oracle's `fields_set`) -> SimMIMConfig fields.
FINETUNE_FIELDS = {
    "DATA.IMG_SIZE": "image_size",
    "MODEL.NUM_CLASSES": "num_labels",
    "MODEL.VIT.PATCH_SIZE": "patch_size",
    "MODEL.VIT.IN_CHANS": "num_channels",
    "MODEL.VIT.EMBED_DIM": "hidden_size",
    "MODEL.VIT.DEPTH": "num_hidden_layers",
    "MODEL.VIT.NUM_HEADS": "num_attention_heads",
    "MODEL.VIT.MLP_RATIO": "mlp_ratio",
    "MODEL.VIT.QKV_BIAS": "qkv_bias",
    "MODEL.VIT.INIT_VALUES": "layer_scale_init_value",
    "MODEL.VIT.USE_APE": "use_absolute_position_embeddings",
    "MODEL.VIT.USE_RPB": "use_relative_position_bias",
    "MODEL.VIT.USE_SHARED_RPB": "use_shared_relative_position_bias",
    "MODEL.VIT.USE_MEAN_POOLING": "use_mean_pooling",
    "MODEL.SWIN.PATCH_SIZE": "patch_size",
    "MODEL.SWIN.IN_CHANS": "num_channels",
    "MODEL.SWIN.EMBED_DIM": "embed_dim",
    "MODEL.SWIN.DEPTHS": "depths",
    "MODEL.SWIN.NUM_HEADS": "num_heads",
    "MODEL.SWIN.WINDOW_SIZE": "window_size",
    "MODEL.SWIN.MLP_RATIO": "mlp_ratio",
    "MODEL.SWIN.QKV_BIAS": "qkv_bias",
    "MODEL.SWIN.APE": "use_absolute_position_embeddings",
    "MODEL.SWIN.PATCH_NORM": "patch_norm",
}


def load_stats(official_recipe_dir, backbone):
    with open(official_recipe_dir / f"init_stats_{backbone}.json") as f:
        return json.load(f)


def build_our_model(official_fixtures_dir, stats, backbone, section):
    """Our model standing for the official one the oracle section describes, as a function of the seed."""
    if section == "pretrain":
        with open(official_fixtures_dir / backbone / "config.json") as f:
            config = SimMIMConfig(**expected_architecture(json.load(f)))
        return lambda: SimMIMForMaskedImageModeling(config)
    fields = stats["finetune"]["fields_set"]
    kwargs = {ours: fields[key] for key, ours in FINETUNE_FIELDS.items() if key in fields}
    image_size = kwargs["image_size"]
    config = SimMIMConfig(backbone=backbone, mask_patch_size=math.gcd(image_size, 32), **kwargs)
    return lambda: SimMIMForImageClassification(config)


def our_name(official_name, section):
    """Official parameter name -> (our parameter name, the "q" or "v" third of it, or None for all of it). The official
    ViT keeps separate q/v biases; ours is one qkv bias (q, k, v thirds)."""
    name = official_name if section == "pretrain" else "encoder." + official_name
    name = re.sub(r"^encoder\.head\.", "classifier.", name)
    name = re.sub(r"^encoder\.fc_norm\.", "simmim.pooler.fc_norm.", name)
    per_block_table = r"^(encoder\.blocks\.\d+)\.attn\.relative_position_bias_table$"
    name = re.sub(per_block_table, r"\1.rel_pos_bias.relative_position_bias_table", name)
    name = re.sub(r"^encoder\.", "simmim.encoder.", name)
    match = re.match(r"^(.*\.attn)\.([qv])_bias$", name)
    if match:
        return match.group(1) + ".qkv.bias", match.group(2)
    return name, None


def family(rule):
    if "truncated at +-1 std" in rule:
        return "truncated"
    if rule.startswith("PyTorch default init: U("):
        return "uniform"
    if "no effective truncation" in rule:
        return "normal"
    raise AssertionError(f"unknown official init rule: {rule}")


def collect_values(build, stats_params, section):
    """official name -> our values over all seeds (float64, flattened), and our parameter names covered."""
    values = {name: [] for name in stats_params}
    covered = set()
    key_biases = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        ours = dict(build().named_parameters())
        all_names = set(ours)
        for official, entry in stats_params.items():
            name, part = our_name(official, section)
            assert name in ours, f"{official}: no parameter {name} in our model"
            tensor = ours[name].detach().double()
            if part is not None:
                width = entry["shape"][0]
                key_biases.append(tensor[width : 2 * width])
                tensor = tensor[:width] if part == "q" else tensor[2 * width :]
            assert list(tensor.shape) == entry["shape"], official
            values[official].append(tensor.flatten())
            covered.add(name)
    assert covered == all_names, f"our parameters without an official counterpart: {sorted(all_names - covered)}"
    for key_bias in key_biases:  # no official counterpart: a key bias does not change softmax; ours starts at 0
        assert torch.equal(key_bias, torch.zeros_like(key_bias))
    return {name: torch.cat(parts) for name, parts in values.items()}


def official_group_std(entries):
    """Pooled std over the seeds of several official tensors, from their per-seed means and stds."""
    count = total = total_sq = 0.0
    for entry in entries:
        for mean, std in zip(entry["per_seed"]["mean"], entry["per_seed"]["std"]):
            count += entry["numel"]
            total += entry["numel"] * mean
            total_sq += entry["numel"] * (std**2 + mean**2)
    return math.sqrt(total_sq / count - (total / count) ** 2)


def assert_random_like_official(official, ours, entry, bound_factor):
    """The distribution family and bounds the official rule gives, and its std for tensors large enough."""
    kind = family(entry["rule"])
    abs_max = ours.abs().max().item()
    std = ours.std(correction=0).item()
    if kind == "truncated":  # at +-1 std of the (possibly rescaled) normal
        bound = entry["expected_std"] / bound_factor
        assert bound <= 0.02 + 1e-7
        assert abs_max <= bound + 1e-7, f"{official}: {abs_max} beyond the official truncation at {bound}"
    elif kind == "uniform":
        bound = entry["expected_std"] * math.sqrt(3)
        assert abs_max <= bound + 1e-7, f"{official}: {abs_max} beyond the uniform bound {bound}"
    elif ours.numel() >= MIN_NUMEL_FOR_STD:  # untruncated normal: a few samples lie beyond 2.5 std
        assert abs_max > 2.5 * entry["pooled_std"], f"{official}: abs max {abs_max} looks truncated"
    if entry["numel"] >= MIN_NUMEL_FOR_STD:
        ratio = std / entry["pooled_std"]
        assert abs(ratio - 1) <= STD_TOLERANCE, f"{official}: std {std:.4g}, official {entry['pooled_std']:.4g}"
        return ratio
    return None


@pytest.mark.parametrize("backbone", ["vit", "swin"])
@pytest.mark.parametrize("section", ["pretrain", "finetune"])
def test_init_matches_official_statistics(official_recipe_dir, official_fixtures_dir, backbone, section):
    stats = load_stats(official_recipe_dir, backbone)
    params = stats[section]["params"]
    build = build_our_model(official_fixtures_dir, stats, backbone, section)
    values = collect_values(build, params, section)
    bound_factor = stats["constants"]["truncated_normal_pm1sigma_std_factor"] if "constants" in stats else None
    ratios, groups = [], {}
    for official, entry in params.items():
        ours = values[official]
        if entry["pooled_std"] == 0:  # a constant: zeros, ones, layer scale
            assert entry["min"] == entry["max"]
            assert torch.all(ours == entry["min"]), f"{official}: not the official constant {entry['min']}"
            continue
        ratio = assert_random_like_official(official, ours, entry, bound_factor)
        if ratio is not None:
            ratios.append(ratio)
        groups.setdefault((family(entry["rule"]), round(entry["expected_std"], 9)), []).append(official)
    # Tensors too small for their own std check are compared within their group (same family and std).
    for key, names in groups.items():
        ours = torch.cat([values[name] for name in names]).std(correction=0).item()
        official = official_group_std([params[name] for name in names])
        assert abs(ours / official - 1) <= STD_TOLERANCE, f"group {key}: std {ours:.4g}, official {official:.4g}"
    print(f"[init] {backbone} {section}: std / official std in [{min(ratios):.4f}, {max(ratios):.4f}]")


def test_classifier_loaded_from_pretraining_checkpoint_gets_official_fine_tuning_init(
    official_recipe_dir, official_fixtures_dir, tmp_path
):
    """What a checkpoint lacks (ViT head, fc_norm) is initialised on loading as the official fine-tuning model,
    and what it holds is left as loaded."""
    stats = load_stats(official_recipe_dir, "vit")["finetune"]["params"]
    torch.manual_seed(0)
    source = build_our_model(official_fixtures_dir, None, "vit", "pretrain")()
    source.save_pretrained(tmp_path)
    model = SimMIMForImageClassification.from_pretrained(tmp_path, num_labels=10, use_mean_pooling=True)
    head = model.classifier.weight.detach().double()
    assert abs(head.std(correction=0).item() / stats["head.weight"]["pooled_std"] - 1) <= STD_TOLERANCE
    assert torch.all(model.classifier.bias == 0)
    assert torch.all(model.simmim.pooler.fc_norm.weight == 1) and torch.all(model.simmim.pooler.fc_norm.bias == 0)
    loaded = dict(model.named_parameters())
    for name, value in source.named_parameters():
        if name in loaded:
            assert torch.equal(loaded[name], value), name
