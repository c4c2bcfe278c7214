"""The quality and data-pipeline benchmarks run in their CPU forms (speed is not asserted)."""

import json

import pytest

from conftest import load_script


def test_quality_benchmark_smoke_runs_the_package_paths(tmp_path, cifar10_small_dir):
    module = load_script("benchmarks/quality_cifar10.py")
    summary = module.main(["--smoke", "--data_dir", str(cifar10_small_dir), "--output_dir", str(tmp_path),
                           "--finetune_args", "--random_erasing 0.5 --layer_decay 0.8"])
    assert 0.0 <= summary["top1_pretrained"] <= 1.0 and 0.0 <= summary["top1_scratch"] <= 1.0
    pretrained = json.loads((tmp_path / "finetune-pretrained" / "all_results.json").read_text())["eval_top1"]
    scratch = json.loads((tmp_path / "finetune-scratch" / "all_results.json").read_text())["eval_top1"]
    assert summary["gain_points"] == pytest.approx(100 * (pretrained - scratch))
    assert summary["masked_l1"] > 0 and summary["psnr_db"] > 0
    for run in ("pretrain", "finetune-pretrained", "finetune-scratch"):
        assert (tmp_path / run / "model.safetensors").is_file()
    for run in ("finetune-pretrained", "finetune-scratch"):  # the extra flags reach both fine-tunings
        card = (tmp_path / run / "README.md").read_text()
        assert "random erasing 0.5" in card and "layer-wise decay 0.8" in card
    assert "finetune_args '--random_erasing 0.5 --layer_decay 0.8'" in summary["protocol"]
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_data_pipeline_benchmark_table(tmp_path, capsys):
    """benchmarks/data_pipeline.py measures the training data path (generated JPEGs, DataLoader with 0 and 1
    workers) and prints its table; speed is not asserted."""
    benchmark = load_script("benchmarks/data_pipeline.py")
    out = tmp_path / "data.json"
    result = benchmark.main([
        "--preset", "vit-tiny-test", "--num_images", "48", "--image_width", "96", "--image_height", "72",
        "--batch_size", "8", "--workers", "0,1", "--work_dir", str(tmp_path / "jpegs"), "--json", str(out),
    ])
    printed = capsys.readouterr().out
    assert len(list((tmp_path / "jpegs").glob("*.jpg"))) == 48
    assert set(result["loader_images_per_s"]) == {"0", "1"} and all(v > 0 for v in result["loader_images_per_s"].values())
    assert set(result["stage_ms"]) == {"open", "decode+crop+resize+flip", "to_uint8", "mask"}
    assert result["transform_images_per_s_one_process"] > 0 and result["image_size"] == 32
    assert "DataLoader workers" in printed and "images/s" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    with pytest.raises(SystemExit):
        benchmark.main(["--workers", "two"])
