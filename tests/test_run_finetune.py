"""examples/run_finetune.py end to end on the bundled sample (tiny model, a few steps), and its refusals."""

import io
import json

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from hf_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMImageProcessor
from hf_simmim.data.loading import label_names, select_per_class

from conftest import load_script


def _script():
    return load_script("examples/run_finetune.py")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained")
    config = SimMIMConfig.from_preset("vit-tiny-test")
    torch.manual_seed(0)
    SimMIMForMaskedImageModeling(config).save_pretrained(path)
    SimMIMImageProcessor.from_model_config(config).save_pretrained(path)
    return path


FAST = ["--max_steps", "6", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64",
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--samples_per_class", "4",
        "--max_eval_samples", "40"]


def test_finetune_from_pretrained_reports_accuracy_and_card(pretrained, tmp_path):
    out = tmp_path / "ft"
    assert _script().main(["--model_name_or_path", str(pretrained), "--output_dir", str(out), *FAST]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_top1"] <= results["eval_top5"] <= 1.0
    assert results["train_samples_per_second"] > 0
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-classification"
    assert "top1" in card.text and "layer-wise decay 0.65" in card.text
    assert "RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25" in card.text  # the official augmentation
    assert "RandomCrop(32, padding=4)" in card.text  # timm's rule for images of 32 px: no resized crop
    assert "| Precision | fp32 |" in card.text  # no autocast on this CPU run
    model = SimMIMForImageClassification.from_pretrained(out)
    assert model.config.num_labels == 10 and model.config.id2label[0] == "airplane"
    # the official ViT fine-tuning: per-block relative position tables, each started from the shared one
    assert model.config.use_relative_position_bias and not model.config.use_shared_relative_position_bias
    # the encoder started from the checkpoint, not from scratch: the patch embedding moved only a little
    source = SimMIMForMaskedImageModeling.from_pretrained(pretrained).simmim.encoder.patch_embed.proj.weight
    tuned = model.simmim.encoder.patch_embed.proj.weight
    assert (tuned - source).norm() < 0.5 * source.norm()


def test_from_scratch_baseline_does_not_load_weights(pretrained, tmp_path):
    out = tmp_path / "scratch"
    assert _script().main(["--model_name_or_path", str(pretrained), "--from_scratch", "--output_dir", str(out), *FAST]) == 0
    model = SimMIMForImageClassification.from_pretrained(out)
    source = SimMIMForMaskedImageModeling.from_pretrained(pretrained).simmim.encoder.patch_embed.proj.weight
    assert (model.simmim.encoder.patch_embed.proj.weight - source).norm() > 0.5 * source.norm()
    # the baseline trains every layer at the full rate (no layer-wise decay)
    assert "layer-wise decay 1.0" in ModelCard.load(out / "README.md").text


@pytest.mark.parametrize("mode", ["linear_probe", "knn"])
def test_frozen_encoder_modes(pretrained, tmp_path, mode):
    out = tmp_path / mode
    args = ["--model_name_or_path", str(pretrained), "--mode", mode, "--output_dir", str(out),
            "--samples_per_class", "8", "--max_eval_samples", "40", "--probe_epochs", "5", "--report_to", "none"]
    assert _script().main(args) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert set(results) == {"eval_top1", "eval_top5", "train_skipped_images", "eval_skipped_images"}


def test_the_bundled_sample_skips_no_image(pretrained, tmp_path, capsys):
    """A full epoch of the official augmentation (RandAugment included) over the 640 training images, then the 200
    validation images: an error raised there would stop the run, and no image of the sample fails to decode."""
    out = tmp_path / "sample"
    args = ["--model_name_or_path", str(pretrained), "--output_dir", str(out), "--num_train_epochs", "1",
            "--per_device_train_batch_size", "64", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none"]
    assert _script().main(args) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert (results["train_skipped_images"], results["eval_skipped_images"]) == (0, 0)
    assert "images skipped (cannot be decoded): 0 training, 0 validation" in capsys.readouterr().out
    assert "could not be decoded: 0 training,\n0 evaluation" in (out / "README.md").read_text()


def labelled_parquet(path, cells):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": c, "path": None} for c in cells], "label": [i % 2 for i in range(len(cells))]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return str(path)


def image_bytes(colour, size=(32, 32), format="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=format)
    return buffer.getvalue()


def test_training_and_validation_skips_are_counted(pretrained, tmp_path):
    good = [image_bytes((i * 9 % 255, 40, 200 - i)) for i in range(20)]
    jpeg = image_bytes((10, 200, 30), size=(64, 48), format="JPEG")
    train = labelled_parquet(tmp_path / "train.parquet", good[:10] + [b"garbage"] + good[10:])
    validation = labelled_parquet(tmp_path / "validation.parquet", good[:8] + [b"garbage", jpeg[: len(jpeg) // 2]])
    out = tmp_path / "ft"
    args = ["--model_name_or_path", str(pretrained), "--output_dir", str(out), "--train_dir", train,
            "--validation_dir", validation, "--max_steps", "4", "--per_device_train_batch_size", "8",
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none"]
    assert _script().main(args) == 0  # 4 steps of 8 do not read every row: the counts do not depend on it
    results = json.loads((out / "all_results.json").read_text())
    assert (results["train_skipped_images"], results["eval_skipped_images"]) == (1, 2)
    assert "could not be decoded: 1 training,\n2 evaluation" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--model_name_or_path is required"),
        (["--mode", "svm"], "--mode"),
        (["--label_fraction", "1.5"], "--label_fraction"),
        (["--samples_per_class", "2", "--label_fraction", "0.5"], "not both"),
        (["--label_column_name", "category"], "'category' is not in the dataset"),
        (["--rand_augment", "augmix-m5"], "--rand_augment='augmix-m5' must start with 'rand-'"),
        (["--random_erasing", "2"], "--random_erasing=2.0"),
    ],
)
def test_refusals(pretrained, tmp_path, args, message):
    base = ["--model_name_or_path", str(pretrained)] if args else []
    with pytest.raises(ValueError, match=message):
        _script().main([*base, *args, "--output_dir", str(tmp_path / "x"), "--report_to", "none"])


def test_select_per_class_is_balanced_and_seeded():
    labels = np.repeat(np.arange(3), [5, 10, 2])
    dataset = datasets.Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
    subset = select_per_class(dataset, "label", samples_per_class=4, seed=1)
    counts = np.bincount(subset["label"])
    assert counts.tolist() == [4, 4, 2]  # a class with fewer rows keeps them all
    assert subset["row"] == select_per_class(dataset, "label", samples_per_class=4, seed=1)["row"]
    assert subset["row"] != select_per_class(dataset, "label", samples_per_class=4, seed=2)["row"]
    half = select_per_class(dataset, "label", fraction=0.5, seed=0)
    assert np.bincount(half["label"]).tolist() == [2, 5, 1]
    assert select_per_class(dataset, "label") is dataset


def test_label_names():
    features = datasets.Features({"label": datasets.ClassLabel(names=["cat", "dog"])})
    assert label_names(datasets.Dataset.from_dict({"label": [0, 1]}, features=features)) == ["cat", "dog"]
    assert label_names(datasets.Dataset.from_dict({"label": [0, 3]})) == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="not integer class labels"):
        label_names(datasets.Dataset.from_dict({"label": ["a", "b"]}))


def test_frozen_encoder_follows_the_config_overrides(pretrained, tmp_path):
    """Probing loads the encoder with the same --config_overrides as the classifier, so a new resolution reaches
    both the image processor and the encoder (its position table interpolated)."""
    out = tmp_path / "knn64"
    args = ["--model_name_or_path", str(pretrained), "--mode", "knn", "--output_dir", str(out),
            "--config_overrides", "image_size=64", "--samples_per_class", "4", "--max_eval_samples", "20",
            "--report_to", "none"]
    assert _script().main(args) == 0
    assert set(json.loads((out / "all_results.json").read_text())) == {
        "eval_top1", "eval_top5", "train_skipped_images", "eval_skipped_images"}
