"""The training crop and flip on the device (`data.device_augmentation`, `--augmentation_device`): the same crop
boxes, flips and masks as the CPU path for the same rows and seeds, PIL's pixels, the refusals, and a short run."""

import io
import json
import math
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script, tiny_vit
from transformers import TrainingArguments

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMImageProcessor
from hf_simmim.data import SeededImageDataset, SimMIMTransform, collate_fn, normalize_pixel_batch
from hf_simmim.data.augmentation import AugmentationPreset, finetuning_augmentation, pretraining_augmentation
from hf_simmim.data.checks import check_image_dataset
from hf_simmim.data.device_augmentation import (
    PILLOW_CHOOSES_PASS_ORDER,
    DeviceAugmentation,
    resized_crops,
    vertical_pass_first,
)
from hf_simmim.training import pretraining
from hf_simmim.training.pretraining import crops_on_device
from hf_simmim.training.trainer import SimMIMTrainer

SIZE = 32  # the tiny model's image size


def processor():
    return SimMIMImageProcessor(image_size=SIZE, patch_size=4, mask_patch_size=8)


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def coordinate_image(width, height):
    """An RGB image whose red channel is x and green channel is y (blue: their sum, to keep it photo-like)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x, y, (x + y) % 256], axis=-1).astype(np.uint8)


def image_dataset(arrays):
    features = datasets.Features({"image": datasets.Image()})
    return datasets.Dataset.from_dict({"image": [{"bytes": png(a), "path": None} for a in arrays]}, features=features)


def recover_geometry(image, size=SIZE):
    """`(left, top, right, bottom), flip` of a crop of a coordinate image resized to `size`: the red (x) and green
    (y) values along the middle of the output are a straight line, `start - 0.5 + (i + 0.5) * scale`, whatever the
    filter (away from the image's border, where PIL renormalises its weights); fitted on the inner outputs."""
    image = image.astype(np.float64)
    inner = np.arange(3, size - 3)
    xs, ys = image[0, size // 2, inner], image[1, inner, size // 2]
    flip = xs[-1] < xs[0]
    if flip:
        xs = xs[::-1]
        inner_x = size - 1 - inner[::-1]
    else:
        inner_x = inner
    box = []
    for positions, values in ((inner_x, xs), (inner, ys)):
        scale, offset = np.polyfit(positions + 0.5, values, 1)
        box.append((offset + 0.5, offset + 0.5 + scale * size))
    (left, right), (top, bottom) = box
    return tuple(int(round(v)) for v in (left, top, right, bottom)), bool(flip)


def seeded_views(dataset, seed=3, epoch=1):
    """The training rows of `dataset` served the CPU way and the device way, with the same seed and epoch."""
    views = []
    for device_crop in (False, True):
        transform = SimMIMTransform(processor(), train=True, keep_columns=(), uint8=True, device_crop=device_crop)
        view = SeededImageDataset(dataset, transform, seed=seed)
        view.set_epoch(epoch)
        views.append(view)
    return views


@pytest.fixture(scope="module")
def coordinate_rows():
    return image_dataset([coordinate_image(64, 48) for _ in range(24)])


def test_each_row_gets_the_crop_box_flip_and_mask_of_the_cpu_path(coordinate_rows):
    dataset = coordinate_rows
    cpu, device = seeded_views(dataset)
    rows = list(range(len(dataset)))
    cpu_batch, device_batch = cpu.batch(rows), device.batch(rows)
    assert device_batch["pixel_values"].shape == (len(rows), 3, 48, 64)  # uncropped
    cropped = DeviceAugmentation(pretraining_augmentation(SIZE))(device_batch)
    assert set(cropped) == {"pixel_values", "bool_masked_pos"}
    flips = []
    for row in rows:
        cpu_geometry = recover_geometry(cpu_batch["pixel_values"][row].numpy())
        device_geometry = recover_geometry(cropped["pixel_values"][row].numpy())
        assert device_geometry == cpu_geometry
        assert device_geometry == (tuple(device_batch["crop_box"][row].tolist()), bool(device_batch["flip"][row]))
        flips.append(device_geometry[1])
    assert 0 < sum(flips) < len(rows)  # both kinds of row are checked
    assert torch.equal(cropped["bool_masked_pos"], cpu_batch["bool_masked_pos"])
    difference = (cropped["pixel_values"].int() - cpu_batch["pixel_values"].int()).abs()
    assert difference.max() <= 1


def test_crop_boxes_follow_the_official_laws_over_many_draws():
    """The boxes the device path is handed: area 0.67-1 of the image, aspect 3/4-4/3 (log-uniform), flip 1/2."""
    dataset = image_dataset([coordinate_image(40, 40)] * 400)
    _, device = seeded_views(dataset, seed=11)
    batch = device.batch(list(range(len(dataset))))
    boxes = batch["crop_box"].double()
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    areas = widths * heights / (40 * 40)
    assert 0.64 <= areas.min() < 0.7 and 0.95 < areas.max() <= 1.0  # 0.67-1, up to the rounding of the sides
    log_aspect = torch.log(widths / heights)
    assert log_aspect.abs().max() <= math.log(4 / 3) + 0.06 and log_aspect.abs().max() > math.log(4 / 3) - 0.06
    assert abs(batch["flip"].double().mean().item() - 0.5) < 0.08


@pytest.mark.parametrize(
    "height, width, size, resample, scale",
    [
        (48, 64, 32, "bilinear", (0.67, 1.0)),  # shrinking
        (40, 56, 64, "bilinear", (0.08, 1.0)),  # enlarging
        (300, 60, 32, "bilinear", (0.08, 1.0)),  # Pillow 13 runs the vertical pass first here
        (96, 96, 32, "bicubic", (0.08, 1.0)),
    ],
)
def test_resize_gives_pils_pixels(height, width, size, resample, scale):
    if (height, width) == (300, 60):  # the case is there for the other pass order: it must take it
        assert vertical_pass_first(height, width, size) == PILLOW_CHOOSES_PASS_ORDER
    rng, draws = np.random.default_rng(1), random.Random(2)
    y, x = np.mgrid[0:height, 0:width]
    images, boxes, flips, expected = [], [], [], []
    for b in range(8):
        smooth = 128 + 100 * np.sin(x / 5 + b) * np.cos(y / 7)
        image = np.stack([smooth, rng.integers(0, 256, (height, width)), (3 * x + 2 * y) % 256]).astype(np.uint8)
        box = AugmentationPreset("test", size, crop_scale=scale).draw_geometry(width, height, draws)[0]
        flip = b % 2 == 1
        reference = Image.fromarray(image.transpose(1, 2, 0)).resize(
            (size, size), {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample], box=box
        )
        if flip:
            reference = reference.transpose(Image.FLIP_LEFT_RIGHT)
        images.append(image), boxes.append(box), flips.append(flip)
        expected.append(np.asarray(reference).transpose(2, 0, 1))
    arguments = (torch.from_numpy(np.stack(images)), torch.tensor(boxes), torch.tensor(flips), size, resample)
    expected = torch.from_numpy(np.stack(expected)).int()
    assert torch.equal(resized_crops(*arguments, dtype=torch.float64).int(), expected)
    difference = (resized_crops(*arguments).int() - expected).abs()
    assert difference.max() <= 1 and (difference > 0).double().mean() <= 0.005


class RecordingTrainer(SimMIMTrainer):
    """`SimMIMTrainer` that records how many batches reached it with crop boxes and the pixel shapes its model got."""

    instances = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cropped_batches, self.model_inputs = 0, []
        RecordingTrainer.instances.append(self)

    def _prepare_inputs(self, inputs):
        self.cropped_batches += "crop_box" in inputs
        prepared = super()._prepare_inputs(inputs)
        self.model_inputs.append(prepared["pixel_values"].shape)
        return prepared


def test_prepared_batch_is_the_cpu_paths_normalised_batch(coordinate_rows, tmp_path):
    dataset = coordinate_rows
    cpu, device = seeded_views(dataset)
    image_processor = processor()
    model = SimMIMForMaskedImageModeling(SimMIMConfig(**tiny_vit()))
    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    trainer = RecordingTrainer(
        model=model, args=args, processing_class=image_processor,
        device_transform=DeviceAugmentation(pretraining_augmentation(SIZE)),
    )
    rows = list(range(8))
    prepared = trainer._prepare_inputs(device.batch(rows))["pixel_values"]
    mean, std = image_processor.image_mean, image_processor.image_std
    expected = normalize_pixel_batch(cpu.batch(rows)["pixel_values"], mean, std)
    one_level = 1 / 255 / min(std)
    assert prepared.dtype == torch.float32 and (prepared - expected).abs().max() <= one_level + 1e-6


def test_images_of_mixed_sizes_are_refused_naming_the_flag():
    mixed = image_dataset([coordinate_image(32, 32), coordinate_image(40, 32)])
    augmentation = pretraining_augmentation(SIZE)
    with pytest.raises(ValueError, match=r"not all of one size.*row 1 .*40x32.*--augmentation_device cpu"):
        crops_on_device("accelerator", sizes_of(mixed), processor(), augmentation, device="cpu")
    assert not crops_on_device("auto", sizes_of(mixed), processor(), augmentation, device="cuda")
    transform = SimMIMTransform(processor(), train=True, keep_columns=(), uint8=True, device_crop=True)
    rows = [transform.transform_row({"image": cell})[0] for cell in undecoded_cells(mixed)]
    with pytest.raises(ValueError, match="different shapes.*3x32x40.*--augmentation_device cpu"):
        collate_fn(rows)


def sizes_of(dataset):
    """The image sizes the header check before training finds (what `crops_on_device` decides from)."""
    sizes = {}
    check_image_dataset(dataset, "image", 1, sizes=sizes)
    return sizes


def undecoded_cells(dataset):
    cells = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    return [{"bytes": cell["bytes"], "path": None} for cell in cells]


def test_auto_crops_on_the_device_only_on_a_cuda_gpu_with_small_images_of_one_size():
    augmentation = pretraining_augmentation(SIZE)
    small, large = image_dataset([coordinate_image(48, 40)] * 3), image_dataset([coordinate_image(80, 64)] * 3)
    assert crops_on_device("auto", sizes_of(small), processor(), augmentation, device="cuda")
    assert not crops_on_device("auto", sizes_of(small), processor(), augmentation, device="cpu")
    assert not crops_on_device("auto", sizes_of(large), processor(), augmentation, device="cuda")  # > 2 x 32 px
    assert crops_on_device("accelerator", sizes_of(large), processor(), augmentation, device="cpu")
    assert not crops_on_device("cpu", sizes_of(small), processor(), augmentation, device="cuda")
    assert not crops_on_device("auto", sizes_of(small), processor(), augmentation, device="mps")
    with pytest.raises(ValueError, match="MPS devices have no float64.*--augmentation_device cpu"):
        crops_on_device("accelerator", sizes_of(small), processor(), augmentation, device="mps")


def test_what_the_device_cannot_do_is_refused():
    rand_augment = AugmentationPreset("fine-tuning", SIZE, rand_augment="rand-m9-mstd0.5-inc1")
    with pytest.raises(ValueError, match="RandAugment.*--augmentation_device cpu"):
        SimMIMTransform(processor(), train=True, uint8=True, augmentation=rand_augment, device_crop=True)
    with pytest.raises(ValueError, match="random_padded"):
        DeviceAugmentation(finetuning_augmentation(SIZE))
    with pytest.raises(ValueError, match="uint8=True"):
        SimMIMTransform(processor(), train=True, device_crop=True)
    with pytest.raises(ValueError, match="streamed.*--augmentation_device cpu"):
        crops_on_device("accelerator", {}, processor(), pretraining_augmentation(SIZE), stream=object())


def test_a_short_run_through_the_device_path_trains(tmp_path, monkeypatch):
    run_mim = load_script("examples/run_mim.py")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:48]
    arrays = [(128 + 90 * np.sin(x / (3 + i % 5) + i)[..., None] * rng.uniform(0.3, 1, 3)).astype(np.uint8)
              for i in range(32)]
    train_file = str(tmp_path / "train.parquet")
    image_dataset(arrays).to_parquet(train_file)
    monkeypatch.setattr(pretraining, "SimMIMTrainer", RecordingTrainer)
    RecordingTrainer.instances.clear()
    out = tmp_path / "out"
    argv = [
        "--train_dir", train_file, "--validation_split_percentage", "25", "--preset", "vit-tiny-test",
        "--per_device_train_batch_size", "8", "--max_steps", "4", "--logging_steps", "1", "--report_to", "none",
        "--num_reconstruction_images", "0", "--augmentation_device", "accelerator", "--output_dir", str(out),
    ]
    assert run_mim.main(argv) == 0
    trainer = RecordingTrainer.instances[-1]
    assert trainer.cropped_batches == 4
    assert all(shape[-2:] == (SIZE, SIZE) for shape in trainer.model_inputs)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
