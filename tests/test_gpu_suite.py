"""benchmarks/gpu_suite.py in its tiny CPU form (what CI runs) records every part's figures in one JSON, keeps to
its time limits, refuses to start without its prerequisites; benchmarks/render_tables.py renders the README tables
from such results between the README's markers (speed is not asserted)."""

import json
import platform
import shutil
import subprocess
import sys
import time

import accelerate
import pytest
import torch
import transformers

from conftest import REPO_ROOT, load_script


@pytest.fixture(scope="module")
def suite():
    return load_script("benchmarks/gpu_suite.py")


@pytest.fixture(scope="module")
def render():
    return load_script("benchmarks/render_tables.py")


@pytest.fixture(scope="module")
def tiny_run(suite, tmp_path_factory, cifar10_small_dir):
    """One run of the tiny suite: (its result, the results folder, the --out folder, the work folder)."""
    root = tmp_path_factory.mktemp("gpu_suite")
    results, out, work = root / "results", root / "out", root / "work"
    result = suite.main(["--tiny", "--results_dir", str(results), "--out", str(out), "--work_dir", str(work),
                         "--data_dir", str(cifar10_small_dir)])
    return result, results, out, work


@pytest.mark.slow
def test_tiny_suite_records_every_part(tiny_run):
    result, results, out, work = tiny_run
    assert set(result["parts"]) == {"throughput_eager", "end_to_end", "quality"}
    assert {part["status"] for part in result["parts"].values()} == {"ok"}
    assert result["tiny"] is True and result["device"].startswith("cpu") and result["suite"] == "gpu_suite"
    assert result["versions"]["torch"] == torch.__version__
    assert result["versions"]["transformers"] == transformers.__version__
    assert result["versions"]["accelerate"] == accelerate.__version__
    assert result["versions"]["python"] == platform.python_version()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert result["commit"] == head.stdout.strip()
    (saved,) = results.glob("gpu-suite-*-tiny.json")
    assert json.loads(saved.read_text()) == json.loads((out / saved.name).read_text()) == json.loads(json.dumps(result))
    log = (out / "gpu_suite.log").read_text()
    assert "run_mim.py" in log
    # the quality protocol's pretraining crops on the device the model trains on (--augmentation_device accelerator)
    assert log.split("===== quality")[1].count("Training crops and flips run on the device of the batch") == 1


@pytest.mark.slow
def test_tiny_suite_figures_are_sane(tiny_run):
    parts = tiny_run[0]["parts"]
    rows = parts["throughput_eager"]["rows"]
    assert [row["model"] for row in rows] == ["transformers ViTForMaskedImageModeling", "hf_simmim vit-tiny-test"]
    for row in rows:
        assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0 and row["mfu"] > 0 and row["batch"] == 4
    assert rows[1]["ratio"] > 0 and "ratio" not in rows[0]

    end_to_end = parts["end_to_end"]
    # 6 steps logged every 2 steps: 3 windows, the first (start-up) left out
    assert len(end_to_end["windows_images_per_s"]) == 2 and all(v > 0 for v in end_to_end["windows_images_per_s"])
    assert end_to_end["images_per_s"] == pytest.approx(sum(end_to_end["windows_images_per_s"]) / 2)
    assert end_to_end["synthetic_images_per_s"] == rows[1]["images_per_s"]
    assert end_to_end["ratio"] == pytest.approx(end_to_end["images_per_s"] / rows[1]["images_per_s"])
    assert end_to_end["crops_on"] == "CPU"  # --augmentation_device auto on a CPU-trained model

    summary = parts["quality"]["summary"]
    assert 0.0 <= summary["top1_pretrained"] <= 1.0 and 0.0 <= summary["top1_scratch"] <= 1.0
    assert summary["gain_points"] == pytest.approx(100 * (summary["top1_pretrained"] - summary["top1_scratch"]))
    assert summary["masked_l1"] > 0 and summary["psnr_db"] > 0


@pytest.mark.slow
def test_render_leaves_tiny_runs_out_unless_asked(tiny_run, render, tmp_path):
    result, results, _, _ = tiny_run
    assert render.load_results(results) == []
    assert render.render([]).count("_no measurement yet_") == 3
    gpu = {**result, "tiny": False, "device": "NVIDIA H200", "date": "2099-01-01T00:00:00+00:00"}
    shutil.copy(next(results.glob("*.json")), tmp_path)
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    assert [r["device"] for r in render.load_results(tmp_path)] == ["NVIDIA H200"]
    both = render.render(render.load_results(tmp_path, include_tiny=True))
    rows = [line for line in both.splitlines() if line.startswith("| NVIDIA H200") or line.startswith("| cpu")]
    assert len(rows) == 2 * (2 + 1 + 1)  # per run: two throughput rows, one end-to-end row, one quality row
    assert all("tiny CPU run" in line for line in rows if line.startswith("| cpu"))
    assert not any("tiny CPU run" in line for line in rows if line.startswith("| NVIDIA H200"))
    ours = result["parts"]["throughput_eager"]["rows"][1]
    assert f"| hf_simmim vit-tiny-test | 4 | {ours['images_per_s']:,.0f} |" in both
    assert f"{ours['ratio']:.2f}x" in both
    assert f"{result['parts']['quality']['summary']['top1_pretrained']:.4f}" in both


@pytest.mark.slow
def test_render_rewrites_only_between_markers(tiny_run, render, tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nIntro.\n\n", "\n\n## Next section\n\nText.\n"
    readme.write_text(f"{before}{render.START_MARKER}\nold table\n{render.END_MARKER}{after}")
    render.main(["--results_dir", str(tiny_run[1]), "--include_tiny", "--write", str(readme)])
    text = readme.read_text()
    block = render.render(render.load_results(tiny_run[1], include_tiny=True))
    assert text == f"{before}{render.START_MARKER}\n{block}{render.END_MARKER}{after}"
    assert "old table" not in text and "tiny CPU run" in text
    render.main(["--results_dir", str(tiny_run[1]), "--include_tiny", "--write", str(readme)])
    assert readme.read_text() == text  # rendering again changes nothing
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="gpu-suite:start"):
        render.main(["--results_dir", str(tiny_run[1]), "--write", str(readme)])


def test_render_refuses_a_foreign_json(render, tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a result of benchmarks/gpu_suite.py"):
        render.load_results(tmp_path)


def test_missing_prerequisites_are_named_before_any_work(suite, tmp_path):
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as stop:
        suite.main(["--tiny", "--parts", "c", "--data_dir", str(tmp_path / "nowhere"), "--results_dir", str(results)])
    assert str(tmp_path / "nowhere") in str(stop.value) and "cp -r ../shared/data/cifar10-small" in str(stop.value)
    assert not results.exists()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="a CUDA device"):
            suite.main(["--parts", "a", "--results_dir", str(results)])
    with pytest.raises(SystemExit):
        suite.parse_args(["--parts", "a,d"])


def test_quality_epochs_fit_the_budget(suite):
    args = suite.parse_args(["--tiny"])  # defaults: 1.8 s per pretraining epoch, 0.3 per fine-tuning, 45 s more
    # 100 x 1.8 + 2 x 100 x 0.3 = 240 s of epochs: 300 s hold them all
    assert suite.quality_plan(args, 300) == {"pretrain_epochs": 100, "finetune_epochs": 100, "budget_s": 300,
                                             "expected_s": 285}
    # 165 s leave 120 s for epochs: half of each
    assert suite.quality_plan(args, 165) == {"pretrain_epochs": 50, "finetune_epochs": 50, "budget_s": 165,
                                             "expected_s": 165}


def test_a_part_past_its_limit_is_killed_recorded_and_saved(suite, tmp_path):
    args = suite.parse_args(["--tiny", "--results_dir", str(tmp_path), "--work_dir", str(tmp_path / "work")])
    run = suite.Suite(args, tmp_path / "work")
    child = "import subprocess, time; print(subprocess.Popen(['sleep', '60']).pid, flush=True); time.sleep(60)"

    def sleeper(suite_, timeout_s):
        suite.checked(*suite_.run("sleeper", [sys.executable, "-c", child], timeout_s), timeout_s)

    suite.run_step(run, "sleeper", sleeper, 2)
    record = json.loads(run.path.read_text())["parts"]["sleeper"]
    assert record["status"] == "timeout" and record["limit_s"] == 2 and "2 s" in record["error"]
    grandchild = int(record["tail"].split()[-1])  # the sleep in its process group got the signal too
    for _ in range(100):  # SIGKILL is delivered asynchronously: wait (at most 10 s) for it to take effect
        if process_state(grandchild) in ("gone", "Z"):
            break
        time.sleep(0.1)
    assert process_state(grandchild) in ("gone", "Z")


def process_state(pid):
    """The state letter of process `pid` in /proc (Z: a zombie), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_jpeg_parquet_repeats_distinct_jpegs(suite, tmp_path):
    import datasets

    path = suite.write_jpeg_parquet(tmp_path / "jpegs.parquet", count=10, unique=4, size=24, processes=2)
    rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert rows.features["image"] == datasets.Image() and len(rows) == 10
    images = [rows[i]["image"] for i in range(10)]
    assert all(image.format == "JPEG" and image.size == (24, 24) for image in images)
    assert len({image.tobytes() for image in images}) == 4
