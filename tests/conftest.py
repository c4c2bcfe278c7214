"""Shared test fixtures: where the official reference fixtures and the CIFAR-10 subset live, and small helpers.

The shared folder sits beside the checkout (`<repo>/../shared`). Without it, the tests that need it are skipped
on a developer machine, but fail under CI (`CI` set), so CI can never silently skip the parity checks.
"""

import importlib.util
import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
OFFICIAL_FIXTURES_DIR = SHARED_DIR / "fixtures" / "official_simmim"
OFFICIAL_RECIPE_DIR = SHARED_DIR / "fixtures" / "official_recipe"
CIFAR10_SMALL_DIR = SHARED_DIR / "data" / "cifar10-small"


def load_script(relative_path):
    """Import a script of the repository (`examples/run_mim.py`, `benchmarks/throughput.py`, ...) as a module."""
    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port():
    """A loopback port nothing listens on now, for a test's process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def running_in_ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_shared_dir(path, what):
    """Return `path` if it is a folder; otherwise fail under CI and skip elsewhere, naming what is missing."""
    path = Path(path)
    if path.is_dir():
        return path
    reason = f"{what} not found at {path} (expected ../shared beside the checkout)"
    if running_in_ci():
        pytest.fail(f"{reason}; CI must not skip these tests.", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def official_fixtures_dir():
    """`<repo>/../shared/fixtures/official_simmim`: the official microsoft/SimMIM reference outputs."""
    return require_shared_dir(OFFICIAL_FIXTURES_DIR, "official SimMIM fixtures")


@pytest.fixture(scope="session")
def official_recipe_dir():
    """`<repo>/../shared/fixtures/official_recipe`: what the official training recipe code does (parameter groups,
    init statistics, interpolation, transforms)."""
    return require_shared_dir(OFFICIAL_RECIPE_DIR, "official SimMIM recipe fixtures")


@pytest.fixture(scope="session")
def cifar10_small_dir():
    """`<repo>/../shared/data/cifar10-small`: a 10k/2k CIFAR-10 subset as Parquet."""
    return require_shared_dir(CIFAR10_SMALL_DIR, "cifar10-small data set")


def perturb_parameters_(model, std=0.1, seed=0):
    """Add Gaussian noise to every parameter so zero biases, unit LayerNorm weights and zero tables become
    non-trivial (a conversion that drops or swaps one of them then changes the outputs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(std * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def randomize_batch_norms_(model, seed=0):
    """`perturb_parameters_` (std 0.2) plus noisy batch-norm running statistics, so that no CNN weight is trivial
    (zero GRN, 1e-6 layer scale, standard running statistics) and a conversion that drops or swaps one changes the
    outputs."""
    perturb_parameters_(model, std=0.2, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model


def max_abs_diff(a, b):
    return (a.detach().float() - b.detach().float()).abs().max().item()


# The tiny models the tests build: 32-px images, 2 blocks / stages, a few channels (fast on a CPU).
TINY_VIT = dict(
    backbone="vit", image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    mask_patch_size=8, drop_path_rate=0.0,
)
TINY_SWIN = dict(
    backbone="swin", image_size=32, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4,
    mask_patch_size=8, drop_path_rate=0.0,
)


def tiny_vit(**overrides):
    """`SimMIMConfig` fields of a tiny ViT (official SimMIM variant unless `overrides` say otherwise)."""
    return {**TINY_VIT, **overrides}


def tiny_swin(**overrides):
    """`SimMIMConfig` fields of a tiny Swin."""
    return {**TINY_SWIN, **overrides}


def tiny_swinv2(**overrides):
    """`SimMIMConfig` fields of a tiny SwinV2 (the tiny Swin's geometry: windows of 4 on 16x16 and 8x8 token grids)."""
    return {**TINY_SWIN, "backbone": "swinv2", **overrides}


# Tiny CNNs: 32-px images, three stages (stride 16), SparK's sparse masking and hierarchical decoder.
TINY_RESNET = dict(
    backbone="resnet", image_size=32, patch_size=4, embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 2, 1],
    layer_type="basic", drop_path_rate=0.0, mask_patch_size=8, conv_masking="sparse", decoder_type="hierarchical",
    decoder_hidden_size=32,
)
TINY_CONVNEXT = dict(
    backbone="convnext", image_size=32, patch_size=4, hidden_sizes=[8, 16, 24], depths=[1, 2, 1], convnext_version=1,
    layer_scale_init_value=0.5, drop_path_rate=0.0, mask_patch_size=8, conv_masking="sparse",
    decoder_type="hierarchical", decoder_hidden_size=32,
)


def tiny_resnet(**overrides):
    """`SimMIMConfig` fields of a tiny ResNet (basic layers)."""
    return {**TINY_RESNET, **overrides}


def tiny_convnext(**overrides):
    """`SimMIMConfig` fields of a tiny ConvNeXt V1 (a layer scale far from its 1e-6 init, so that it matters)."""
    return {**TINY_CONVNEXT, **overrides}


def tiny_convnextv2(**overrides):
    """`SimMIMConfig` fields of a tiny ConvNeXt V2 (GRN, no layer scale)."""
    return {**TINY_CONVNEXT, "convnext_version": 2, "layer_scale_init_value": 0.0, **overrides}
