"""benchmarks/inpainting.py: its classical fills do what they claim, and its --tiny run (a short pretraining through
run_mim.py) prints the table of every mask kind and method (quality is not asserted)."""

import json

import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmarks/inpainting.py")


def test_harmonic_fill_solves_the_laplace_equation_on_the_hole(benchmark):
    image = np.zeros((5, 6, 1), dtype=np.uint8)
    image[..., 0] = np.arange(6) * 40  # a linear ramp is harmonic: the fill must continue it exactly
    mask = np.zeros((5, 6), dtype=bool)
    mask[1:4, 2:5] = True
    np.testing.assert_array_equal(benchmark.harmonic_fill(image, mask), image)
    # by hand: one hole between 10, 20, 30 and 100 -> their mean 40; two holes side by side with neighbours
    # a, b, c (left) and d, e, f (right): x = (a + b + c + y) / 4, y = (d + e + f + x) / 4
    single = np.array([[0, 10, 0], [20, 0, 30], [0, 100, 0]], dtype=np.uint8)[..., None]
    hole = np.zeros((3, 3), dtype=bool)
    hole[1, 1] = True
    assert benchmark.harmonic_fill(single, hole)[1, 1, 0] == 40
    pair = np.array([[0, 4, 8, 0], [12, 0, 0, 16], [0, 20, 60, 0]], dtype=np.uint8)[..., None]
    holes = np.zeros((3, 4), dtype=bool)
    holes[1, 1:3] = True
    left, right = 4 + 12 + 20, 8 + 16 + 60  # x = (left + y) / 4, y = (right + x) / 4
    x = (4 * left + right) / 15
    y = (4 * right + left) / 15
    np.testing.assert_array_equal(benchmark.harmonic_fill(pair, holes)[1, 1:3, 0], np.round([x, y]))


def test_tiny_run_prints_the_table(benchmark, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = benchmark.main(["--tiny", "--json", str(out)])
    printed = capsys.readouterr().out
    methods = ["SimMIM pipeline", "mean colour", "harmonic"] + (
        ["OpenCV telea", "OpenCV navier-stokes"] if benchmark.opencv_fills() else []
    )
    kinds = ["random_block 0.6", "random_patch 0.6", "block_wise 0.4", "grid 0.5", "center 0.25", "box"]
    assert [(row["masks"], row["method"]) for row in rows] == [(kind, method) for kind in kinds for method in methods]
    for row in rows:
        assert 0 < row["l1"] < 1 and row["psnr_db"] > 0 and f"{row['psnr_db']:.2f}" in printed
    assert "held-out images" in printed and "best PSNR with box masks" in printed
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    # the 16 centre masks of 25% of the patches: a 4 x 4 patch box, 16 x 16 px; mean-colour L1 recomputed here
    centre = next(row for row in rows if row["masks"] == "center 0.25")
    assert centre["masked"] == pytest.approx(0.25)
    images = benchmark.held_out_images(16).astype(np.float64) / 255
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 8:24] = True
    visible_mean = np.stack([image[~mask].mean(axis=0) for image in images])
    filled = np.round(visible_mean * 255) / 255
    expected_l1 = np.mean([np.abs(image[mask] - colour).mean() for image, colour in zip(images, filled)])
    mean_colour = next(row for row in rows if row["masks"] == "center 0.25" and row["method"] == "mean colour")
    assert mean_colour["l1"] == pytest.approx(expected_l1, rel=1e-5)
