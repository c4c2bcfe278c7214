"""`hf-simmim`: what a user gets for a checkpoint or image that does not exist (one line, exit status 2)."""

import numpy as np
import pytest
from PIL import Image

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling
from hf_simmim.cli import main


def run(argv, capsys):
    capsys.readouterr()  # only what the command writes
    status = main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("command", ["reconstruct", "attention"])
@pytest.mark.parametrize("name", ["out/", "out", "missing-org/missing-model"])
def test_a_missing_checkpoint_is_named_before_loading(command, name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "out/" and "out" do not exist here; the tests run offline (conftest)
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    status, err = run([command, name, str(image), "--output", "picture.png"], capsys)
    assert status == 2
    assert f"no such folder or hub id: {name}" in err
    assert "Traceback" not in err and not (tmp_path / "picture.png").exists()


def test_missing_checkpoints_of_the_convert_commands(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    status, err = run(["convert", "to-transformers", missing + "/", str(tmp_path / "hf")], capsys)
    assert status == 2 and f"no such folder or hub id: {missing}/" in err
    for source in ("official", "transformers"):  # local files only: no hub id can stand for them
        status, err = run(["convert", source, missing, str(tmp_path / "out")], capsys)
        assert status == 2 and f"no such file or folder: {missing}" in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "out").exists()


def test_a_missing_image_is_named(tmp_path, capsys):
    SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit-tiny-test")).save_pretrained(tmp_path / "ckpt")
    status, err = run(["reconstruct", str(tmp_path / "ckpt"), str(tmp_path / "missing.png")], capsys)
    assert status == 2
    assert err.startswith("error: ") and "missing.png" in err and "Traceback" not in err


def inpainting_files(tmp_path):
    """A checkpoint saved without an image processor (the pipeline builds one from its config), a 50x40 image and a
    mask file of the box x 10-29, y 5-19."""
    SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit-tiny-test")).save_pretrained(tmp_path / "ckpt")
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    to_fill = np.zeros((40, 50), dtype=bool)
    to_fill[5:20, 10:30] = True
    Image.fromarray(to_fill.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    return str(tmp_path / "ckpt"), str(tmp_path / "image.png"), image, to_fill


def test_inpaint_fills_a_mask_file_or_a_box_and_keeps_every_other_pixel(tmp_path, capsys):
    checkpoint, image_path, image, to_fill = inpainting_files(tmp_path)
    by_mask, by_box = tmp_path / "out" / "by_mask.png", tmp_path / "by_box.png"
    assert main(["inpaint", checkpoint, image_path, "--mask", str(tmp_path / "mask.png"), "--output", str(by_mask)]) == 0
    assert f"Wrote {by_mask}" in capsys.readouterr().out
    assert main(["inpaint", checkpoint, image_path, "--box", "10,5,30,20", "--output", str(by_box)]) == 0
    filled = np.asarray(Image.open(by_mask))
    np.testing.assert_array_equal(filled[~to_fill], image[~to_fill])
    assert (filled[to_fill] != image[to_fill]).any()
    np.testing.assert_array_equal(np.asarray(Image.open(by_box)), filled)  # x1, y1 excluded, as PIL's crop box


@pytest.mark.parametrize(
    "region, message",
    [
        (["--box", "10,5,60,20"], "not inside the 50x40 image"),
        (["--mask", "missing-mask.png"], "missing-mask.png"),
        (["--mask", "small-mask.png"], "The mask is 32x32 (width x height) but the image is 50x40"),
    ],
)
def test_inpaint_refuses_an_unusable_mask_in_one_line(region, message, tmp_path, capsys, monkeypatch):
    checkpoint, image_path, _, _ = inpainting_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save("small-mask.png")
    status, err = run(["inpaint", checkpoint, image_path, *region, "--output", "filled.png"], capsys)
    assert status == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "filled.png").exists()


def test_inpaint_arguments(tmp_path, capsys):
    status, err = run(["inpaint", str(tmp_path / "missing"), "image.png", "--box", "0,0,4,4"], capsys)
    assert status == 2 and "no such folder or hub id" in err
    for region in (["--box", "1,2,3"], ["--box", "a,b,c,d"], []):  # malformed or no region: argparse refuses
        with pytest.raises(SystemExit) as exit_info:
            main(["inpaint", str(tmp_path), "image.png", *region])
        assert exit_info.value.code == 2
    assert "x0,y0,x1,y1" in capsys.readouterr().err
