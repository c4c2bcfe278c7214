"""Checkpoints saved by earlier releases keep loading and computing what they computed then.

`tests/fixtures/checkpoints_v0_1/` holds models, image processors and outputs saved by hf_simmim 0.1.0 (the flat
layout, before the sub-packages); see its README.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForMaskedImageModeling

import hf_simmim  # noqa: F401  (registers the Auto classes)
from hf_simmim import SimMIMImageProcessor

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_v0_1"


@pytest.mark.parametrize("name", ["vit-tiny-test", "swin-tiny-test"])
def test_a_checkpoint_saved_by_version_0_1_gives_its_saved_outputs(name):
    checkpoint = FIXTURES / name
    expected = load_file(checkpoint / "expected_outputs.safetensors")
    model = AutoModelForMaskedImageModeling.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        outputs = model(pixel_values=expected["pixel_values"], bool_masked_pos=expected["bool_masked_pos"])
    torch.testing.assert_close(outputs.reconstruction, expected["reconstruction"], rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs.loss.reshape(1), expected["loss"], rtol=0, atol=1e-6)


def test_a_version_0_1_image_processor_loads_without_its_training_settings():
    processor = AutoImageProcessor.from_pretrained(FIXTURES / "swin-tiny-test")
    assert isinstance(processor, SimMIMImageProcessor)
    assert (processor.image_size, processor.patch_size, processor.mask_patch_size) == (32, 2, 8)
    # 0.1 stored the training augmentation in the processor; it is a named preset now and is not carried over
    for key in SimMIMImageProcessor.LEGACY_TRAINING_KEYS:
        assert not hasattr(processor, key)
        assert key not in processor.to_dict()
