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
