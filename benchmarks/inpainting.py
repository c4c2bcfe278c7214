"""How well does a SimMIM model fill holes? The inpainting pipeline against classical fills, on held-out images.

Protocol: the 200 held-out test images of the CIFAR-10 sample bundled with hf_simmim (32 x 32; the default run of
`examples/run_mim.py` trains on the 640 training images only), one mask per image and mask strategy, drawn with a
fixed seed: the mask generators of `hf_simmim` at the model's patch grid (`random_block` 0.6 as in pretraining,
`random_patch` 0.6, `block_wise` 0.4, `grid` 0.5, `center` 0.25) and `box`, a box of 6 to 16 px a side anywhere,
not aligned to the patches (the pipeline snaps it to them). Each method fills the same masked pixels; L1 (mean
absolute error on [0, 1] pixels) and PSNR (per image, then averaged) are measured on the masked pixels only, with the
package's `masked_reconstruction` metric.

Methods: `SimMIM pipeline` (`pipeline("image-inpainting")`), `mean colour` (each channel's mean over the visible
pixels), `harmonic` (the Laplace equation solved over the masked pixels, visible pixels as the boundary: the
classical membrane / diffusion fill, with NumPy and SciPy), and OpenCV's `telea` and `navier-stokes`
(`cv2.inpaint`, radius 3) when `opencv-python-headless` is installed.

    python benchmarks/inpainting.py                        # pretrains the default tiny model first (run_mim.py)
    python benchmarks/inpainting.py --checkpoint DIR       # a checkpoint of yours (32 px models: the sample's size)
    python benchmarks/inpainting.py --tiny                 # a quick check of the path: 1 epoch on 64 images, 16 images
"""

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hf_simmim import INPAINTING_TASK, SimMIMMaskGenerator, metrics  # noqa: E402
from hf_simmim.data import bundled_sample_data_files  # noqa: E402

# (strategy, mask_ratio): the mask generators', and `box`: a box not aligned to the patches
MASKS = (("random_block", 0.6), ("random_patch", 0.6), ("block_wise", 0.4), ("grid", 0.5), ("center", 0.25),
         ("box", None))
BOX_SIDES = (6, 16)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a SimMIM pretraining checkpoint (default: pretrain one)")
    parser.add_argument("--num_images", type=int, default=200, help="held-out images measured (at most 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--tiny", action="store_true", help="a quick check: 1 epoch on 64 images, 16 test images")
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_images = min(args.num_images, 16)
    return args


def pretrain(output_dir, tiny):
    """`examples/run_mim.py` with its defaults (the tiny preset on the bundled sample): the checkpoint's folder."""
    spec = importlib.util.spec_from_file_location("run_mim", ROOT / "examples" / "run_mim.py")
    run_mim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_mim)
    argv = ["--output_dir", str(output_dir), "--report_to", "none"]
    if tiny:
        argv += ["--max_train_samples", "64", "--num_train_epochs", "1", "--eval_strategy", "no",
                 "--num_reconstruction_images", "0"]
    if run_mim.main(argv) != 0:
        raise RuntimeError("pretraining failed")
    return str(output_dir)


def held_out_images(count):
    """The bundled sample's test images as uint8 (N, H, W, 3)."""
    import datasets

    test = datasets.load_dataset("parquet", data_files={"test": bundled_sample_data_files()["validation"]})["test"]
    return np.stack([np.asarray(test[i]["image"].convert("RGB")) for i in range(min(count, len(test)))])


def draw_masks(strategy, ratio, config, count, seed):
    """`count` bool (H, W) pixel masks of a strategy at the model's patch grid, or unaligned boxes."""
    side = config.image_size
    if strategy == "box":
        rng = np.random.default_rng(seed)
        masks = np.zeros((count, side, side), dtype=bool)
        for mask in masks:
            height, width = rng.integers(BOX_SIDES[0], BOX_SIDES[1] + 1, size=2)
            top, left = rng.integers(0, side - height + 1), rng.integers(0, side - width + 1)
            mask[top : top + height, left : left + width] = True
        return masks
    generator = SimMIMMaskGenerator(side, config.mask_patch_size, config.patch_size, ratio, strategy, seed=seed)
    return np.stack([generator() for _ in range(count)]).repeat(config.patch_size, 1).repeat(config.patch_size, 2)


# ---------------------------------------------------------------------------------------------- classical fills
def mean_colour_fill(image, mask):
    filled = image.copy()
    filled[mask] = np.round(image[~mask].mean(axis=0)).astype(np.uint8)
    return filled


def harmonic_fill(image, mask):
    """Solve the discrete Laplace equation over the masked pixels (4 neighbours; image borders reflect), the visible
    pixels around them fixed: the smoothest fill that meets the boundary (a membrane / diffusion inpainting)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    unknown = -np.ones(mask.shape, dtype=np.int64)
    unknown[ys, xs] = np.arange(len(ys))
    degree = np.zeros(len(ys))
    rhs = np.zeros((len(ys), image.shape[-1]))
    rows, columns = [], []
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        inside = np.nonzero((ys + dy >= 0) & (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width))[0]
        ny, nx = ys[inside] + dy, xs[inside] + dx
        degree[inside] += 1
        neighbour_masked = mask[ny, nx]
        rows.append(inside[neighbour_masked])
        columns.append(unknown[ny[neighbour_masked], nx[neighbour_masked]])
        np.add.at(rhs, inside[~neighbour_masked], image[ny[~neighbour_masked], nx[~neighbour_masked]])
    rows, columns = np.concatenate(rows), np.concatenate(columns)
    laplacian = coo_matrix((-np.ones(len(rows)), (rows, columns)), shape=(len(ys),) * 2).tocsr()
    laplacian.setdiag(degree)
    filled = image.copy()
    filled[ys, xs] = np.clip(np.round(spsolve(laplacian.tocsc(), rhs)), 0, 255).reshape(len(ys), -1)
    return filled


def opencv_fills():
    """OpenCV's two inpainting methods, where `opencv-python-headless` is installed."""
    try:
        import cv2
    except ImportError:
        return {}

    def fill(flag):
        return lambda image, mask: cv2.inpaint(image, mask.astype(np.uint8), 3, flag)

    return {"OpenCV telea": fill(cv2.INPAINT_TELEA), "OpenCV navier-stokes": fill(cv2.INPAINT_NS)}


# ---------------------------------------------------------------------------------------------- measure
def masked_scores(filled, images, masks):
    """Masked L1 and PSNR on [0, 1] pixels (the package's `masked_reconstruction` metric, identity normalisation)."""
    metric = metrics.load("masked_reconstruction")
    to_unit = lambda pixels: pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # noqa: E731
    scores = metric.compute(predictions=to_unit(filled), references=to_unit(images),
                            masks=masks.astype(np.float32), image_mean=(0.0,) * 3, image_std=(1.0,) * 3)
    return scores["masked_l1"], scores["psnr"]


def measure(checkpoint, images, seed):
    """One row per mask strategy and method."""
    from transformers import pipeline

    inpainter = pipeline(INPAINTING_TASK, model=checkpoint, device=-1)
    methods = {"SimMIM pipeline": lambda image, mask: inpainter(image, mask=mask),
               "mean colour": mean_colour_fill, "harmonic": harmonic_fill, **opencv_fills()}
    rows = []
    for strategy, ratio in MASKS:
        masks = draw_masks(strategy, ratio, inpainter.model.config, len(images), seed)
        for method, fill in methods.items():
            filled = np.stack([fill(image, mask) for image, mask in zip(images, masks)])
            if (filled[~masks] != images[~masks]).any():
                raise AssertionError(f"{method} changed visible pixels")
            l1, psnr = masked_scores(filled, images, masks)
            rows.append(dict(masks=strategy if ratio is None else f"{strategy} {ratio}", masked=float(masks.mean()),
                             method=method, l1=l1, psnr_db=psnr))
    return rows


def print_table(rows, checkpoint, count):
    print(f"\nInpainting, {count} held-out images of the bundled CIFAR-10 sample, checkpoint {checkpoint}")
    print("L1: mean |error| on [0, 1] pixels, PSNR: per image; both over the masked pixels only.\n")
    print(f"{'masks':<18}{'masked':>8}  {'method':<22}{'L1':>8}{'PSNR dB':>9}")
    for index, row in enumerate(rows):
        lead = (f"{row['masks']:<18}{row['masked']:>8.0%}" if index == 0 or rows[index - 1]["masks"] != row["masks"]
                else " " * 26)
        print(f"{lead}  {row['method']:<22}{row['l1']:>8.4f}{row['psnr_db']:>9.2f}")
    for masks in dict.fromkeys(row["masks"] for row in rows):
        best = max((row for row in rows if row["masks"] == masks), key=lambda row: row["psnr_db"])
        print(f"best PSNR with {masks} masks: {best['method']}")


def main(argv=None):
    args = parse_args(argv)
    images = held_out_images(args.num_images)
    with tempfile.TemporaryDirectory() as work:
        checkpoint = args.checkpoint or pretrain(Path(work) / "pretrained", args.tiny)
        rows = measure(checkpoint, images, args.seed)
    print_table(rows, args.checkpoint or "pretrained by examples/run_mim.py" + (" --tiny" if args.tiny else ""),
                len(images))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
