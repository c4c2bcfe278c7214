"""benchmarks/throughput.py in its tiny CPU form produces its table (speed is not asserted)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_tiny_cpu_table(tmp_path, capsys):
    benchmark = _load_benchmark()
    out = tmp_path / "rows.json"
    rows = benchmark.main(["--tiny", "--batch_size", "2", "--warmup", "1", "--repeats", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "images/s" in printed and "MFU" in printed
    names = [row["model"] for row in rows]
    assert names == [
        "transformers ViTForMaskedImageModeling",
        "hf_simmim vit-tiny-test",
        "transformers SwinForMaskedImageModeling",
        "hf_simmim swin-tiny-test",
    ]
    for row in rows:
        assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0 and 0 < row["mfu"]
        assert row["model"] in printed
    ours = [row for row in rows if row["model"].startswith("hf_simmim")]
    assert all(abs(row["ratio"] - row["images_per_s"] / theirs["images_per_s"]) < 1e-9 for row, theirs in zip(ours, rows[::2]))
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
