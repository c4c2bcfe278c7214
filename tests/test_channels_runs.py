"""End to end on data that is not RGB photos: a folder of 1-channel 16-bit PNGs and a folder of 5-band .npy
arrays each pretrain with run_mim.py, fine-tune with run_finetune.py (labels from the folder names) and
reconstruct with `hf-simmim reconstruct`, on the CPU, with tiny models and a few steps."""

import json

import numpy as np
import pytest
from PIL import Image

from hf_simmim import SimMIMForImageClassification, SimMIMImageProcessor
from hf_simmim.cli import main as cli

from conftest import load_script

CLASSES = ("clear", "cloudy")
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--report_to", "none", "--logging_steps", "1"]


def write_png16_folder(root):
    """6 images per class, 36 x 40 px, 16-bit: one class around 20000, the other around 40000."""
    rng = np.random.default_rng(0)
    images = []
    for label, base in zip(CLASSES, (20000, 40000)):
        (root / label).mkdir(parents=True)
        for index in range(6):
            image = (base + rng.integers(0, 3000, size=(36, 40))).astype(np.uint16)
            Image.fromarray(image).save(root / label / f"{index}.png")
            images.append(image)
    return images


def write_npy_folder(root):
    """6 arrays per class of 5 bands, 36 x 40 px, float32 (channels first)."""
    rng = np.random.default_rng(1)
    arrays = []
    for label, scale in zip(CLASSES, (1.0, 3.0)):
        (root / label).mkdir(parents=True)
        for index in range(6):
            array = (rng.random((5, 36, 40)) * scale + np.arange(5)[:, None, None]).astype(np.float32)
            np.save(root / label / f"{index}.npy", array)
            arrays.append(array)
    return arrays


@pytest.mark.parametrize("kind", ["png16", "npy5"])
def test_pretrain_finetune_and_reconstruct(kind, tmp_path, capsys):
    data = tmp_path / kind
    images = write_png16_folder(data) if kind == "png16" else write_npy_folder(data)
    channels = 1 if kind == "png16" else 5
    pretrained = tmp_path / "pretrained"
    display = ["--display_channels", "3", "1", "0"] if channels == 5 else []
    run_mim = load_script("examples/run_mim.py")
    argv = ["--train_dir", str(data), "--num_channels", str(channels), "--output_dir", str(pretrained),
            "--validation_split_percentage", "0", "--num_reconstruction_images", "3", *display, *FAST]
    assert run_mim.main(argv) == 0

    # the processor reads the images at full precision, normalised by the statistics of all training images
    processor = SimMIMImageProcessor.from_pretrained(pretrained)
    pixels = np.concatenate([np.asarray(i, np.float64).reshape(channels, -1) for i in images], axis=1)
    scale = 1 / 65535 if kind == "png16" else 1.0
    assert processor.num_channels == channels and not processor.do_convert_rgb and processor.rescale_factor == scale
    np.testing.assert_allclose(processor.image_mean, pixels.mean(axis=1) * scale, rtol=1e-9)
    np.testing.assert_allclose(processor.image_std, pixels.std(axis=1) * scale, rtol=1e-9)
    assert Image.open(pretrained / "reconstruction.png").height >= 3 * 96
    card = (pretrained / "README.md").read_text()
    assert f"{channels} channel{'s' * (channels > 1)} at full precision" in card

    finetuned = tmp_path / "finetuned"
    run_finetune = load_script("examples/run_finetune.py")
    argv = ["--model_name_or_path", str(pretrained), "--train_dir", str(data), "--output_dir", str(finetuned),
            "--validation_split_percentage", "25", "--eval_strategy", "no", "--save_strategy", "no", *FAST]
    assert run_finetune.main(argv) == 0
    classifier = SimMIMForImageClassification.from_pretrained(finetuned)
    assert classifier.config.id2label == dict(enumerate(CLASSES)) and classifier.config.num_channels == channels
    assert 0.0 <= json.loads((finetuned / "all_results.json").read_text())["eval_top1"] <= 1.0
    # fine-tuning keeps the pretraining normalisation
    assert SimMIMImageProcessor.from_pretrained(finetuned).image_mean == processor.image_mean
    assert "RandAugment" not in (finetuned / "README.md").read_text()

    files = sorted(str(p) for p in data.glob("*/0.*"))
    output = tmp_path / "grid.png"
    assert cli(["reconstruct", str(pretrained), *files, "--output", str(output), *display]) == 0
    assert Image.open(output).height >= 2 * 96 and str(output) in capsys.readouterr().out


def test_stats_prints_the_statistics_a_run_would_compute(tmp_path, capsys):
    arrays = write_npy_folder(tmp_path / "bands")
    assert cli(["stats", str(tmp_path / "bands")]) == 0
    out = capsys.readouterr().out
    pixels = np.concatenate([a.reshape(5, -1) for a in arrays], axis=1).astype(np.float64)
    means = [float(v) for v in out.split("image_mean:")[1].split("\n")[0].split()]
    stds = [float(v) for v in out.split("image_std:")[1].split("\n")[0].split()]
    np.testing.assert_allclose(means, pixels.mean(axis=1), rtol=1e-7)
    np.testing.assert_allclose(stds, pixels.std(axis=1), rtol=1e-7)
    assert "run_mim.py --num_channels 5 --image_mean" in out
    assert cli(["stats", str(tmp_path / "missing")]) == 2


def test_a_model_of_another_channel_count_is_refused_before_training(tmp_path):
    write_npy_folder(tmp_path / "bands")
    with pytest.raises(ValueError, match=r"have 5 channel\(s\) .* takes num_channels=3.*--num_channels 5"):
        load_script("examples/run_mim.py").main(["--train_dir", str(tmp_path / "bands"), "--output_dir",
                                                   str(tmp_path / "out"), *FAST])
    with pytest.raises(ValueError, match=r"--display_channels 5 1 0: .* each in 0..4"):
        load_script("examples/run_mim.py").main(["--train_dir", str(tmp_path / "bands"), "--num_channels", "5",
                                                   "--display_channels", "5", "1", "0", "--output_dir",
                                                   str(tmp_path / "out"), *FAST])
    assert not (tmp_path / "out" / "model.safetensors").exists()
