"""The `hf-simmim` command: convert checkpoints, and draw reconstructions and attention maps.

    hf-simmim convert official CHECKPOINT.pth OUTPUT_DIR [--allow-unsafe-pickle] [--image_size N ...]
    hf-simmim convert transformers MODEL_DIR OUTPUT_DIR
    hf-simmim convert to-transformers SIMMIM_DIR OUTPUT_DIR
    hf-simmim reconstruct CHECKPOINT IMAGE... --output grid.png [--display_channels R G B] [--mask_strategy NAME]
    hf-simmim stats DATA [--image_column NAME] [--num_channels N]
    hf-simmim shard DIR OUT [--shard_size 512MB] [--shuffle_seed N | --keep_order]
    hf-simmim attention CHECKPOINT IMAGE... --output map.png
    hf-simmim inpaint CHECKPOINT IMAGE (--mask MASK | --box x0,y0,x1,y1) --output filled.png

A checkpoint that does not exist (no such local path, nor hub model id) or a missing image ends with a one-line
error and exit status 2, before anything is loaded; so does a mask the inpainting cannot use.
"""

import argparse
import os
import sys

# Fields a checkpoint cannot always tell, overridable on the command line.
_OVERRIDES = {
    "image_size": int,
    "num_attention_heads": int,
    "mask_patch_size": int,
    "mask_ratio": float,
    "drop_path_rate": float,
    "layer_norm_eps": float,
    "window_size": int,
    # the weights cannot tell the target: e.g. --norm_target local for a SwinV2 trained with the official NORM_TARGET
    "norm_target": str,
    "norm_target_patch_size": int,
    # a converted transformers ResNet / ConvNeXt takes its preset's masking and decoder unless told otherwise
    "conv_masking": str,
    "decoder_type": str,
    "decoder_hidden_size": int,
}


def _add_overrides(parser):
    group = parser.add_argument_group("overrides for what the checkpoint cannot tell")
    for name, kind in _OVERRIDES.items():
        group.add_argument(f"--{name}", type=kind, default=None)


def _overrides(args):
    return {name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None}


def missing_checkpoint(name, hub=True):
    """The error line for a checkpoint that does not exist, or None. `hub`: a model id of the Hugging Face hub may
    stand for a local path (found in the local cache, or on the hub when online)."""
    if os.path.exists(name):
        return None
    if not hub:
        return f"no such file or folder: {name}"
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return f"no such folder or hub id: {name}"
    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return None
    if huggingface_hub.is_offline_mode():
        return f"no such folder or hub id: {name} (offline: only the local hub cache was searched)"
    try:
        found = huggingface_hub.repo_exists(name)
    except Exception as error:  # any failure to reach the hub: report it here rather than deep inside loading
        return f"no such folder: {name}, and the hub could not be asked for a model {name!r} ({error})"
    return None if found else f"no such folder or hub id: {name}"


def _checkpoint_argument(args):
    """`(path, hub)`: the checkpoint a command reads, and whether a hub id may stand for it."""
    if args.command != "convert":
        return args.checkpoint, True
    if args.source == "official":
        return args.checkpoint, False
    return args.model_dir, args.source == "to-transformers"


def _box(text):
    """`--box x0,y0,x1,y1` -> four integers."""
    try:
        box = tuple(int(value) for value in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not a box: give four integers x0,y0,x1,y1, e.g. 8,8,24,20.")
    return box


def build_parser():
    parser = argparse.ArgumentParser(prog="hf-simmim", description="SimMIM for Hugging Face transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_convert_parser(commands)
    _add_picture_parsers(commands)
    _add_data_parsers(commands)
    return parser


def _add_convert_parser(commands):
    convert = commands.add_parser("convert", help="convert checkpoints into (or out of) hf_simmim")
    sources = convert.add_subparsers(dest="source", required=True)
    official = sources.add_parser("official", help="a microsoft/SimMIM pretraining checkpoint (.pth)")
    official.add_argument("checkpoint")
    official.add_argument("output_dir")
    official.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="unpickle a checkpoint that torch.load(weights_only=True) refuses (runs code: trusted files only)",
    )
    _add_overrides(official)
    hf = sources.add_parser(
        "transformers",
        help="a transformers ViT/Swin/Swinv2 ForMaskedImageModeling or ResNet/ConvNext/ConvNextV2 model or classifier "
        "folder",
    )
    hf.add_argument("model_dir")
    hf.add_argument("output_dir")
    _add_overrides(hf)
    export = sources.add_parser("to-transformers", help="export an hf_simmim checkpoint to transformers' own classes")
    export.add_argument("model_dir")
    export.add_argument("output_dir")


def _add_picture_parsers(commands):
    """reconstruct, attention and inpaint: a checkpoint and images in, a picture out."""
    reconstruct = commands.add_parser("reconstruct", help="draw a reconstruction grid for images")
    reconstruct.add_argument("checkpoint")
    reconstruct.add_argument("images", nargs="+")
    reconstruct.add_argument("--output", default="reconstruction.png")
    reconstruct.add_argument("--mask_seed", type=int, default=0)
    reconstruct.add_argument(
        "--display_channels", type=int, nargs="+", default=None, metavar="C",
        help="channels shown as red, green, blue (one: as grey); default RGB as it is, grey, else the first three",
    )
    reconstruct.add_argument("--mask_strategy", default=None, help="draw masks this way (default: the checkpoint's)")

    attention = commands.add_parser(
        "attention",
        help="draw the last block's attention over images (ViT: the CLS token's; Swin: received, per window)",
    )
    attention.add_argument("checkpoint")
    attention.add_argument("images", nargs="+")
    attention.add_argument("--output", default="attention.png")

    inpaint = commands.add_parser("inpaint", help="fill a region of an image with the model's prediction")
    inpaint.add_argument("checkpoint")
    inpaint.add_argument("images", nargs=1, metavar="image", help="the image (any size; resized to the model's)")
    region = inpaint.add_mutually_exclusive_group(required=True)
    region.add_argument("--mask", help="a mask image of the image's size: its nonzero pixels are filled")
    region.add_argument("--box", type=_box, metavar="x0,y0,x1,y1", help="a box to fill, in pixels (x1, y1 excluded)")
    inpaint.add_argument("--output", default="filled.png")


def _add_data_parsers(commands):
    """stats and shard: a dataset in."""
    stats = commands.add_parser(
        "stats", help="print the per-channel mean and std of a dataset's training images (run_mim.py's --image_mean/std)"
    )
    stats.add_argument("data", help="a folder of images or .npy files, Parquet/Arrow file(s), or a hub dataset")
    stats.add_argument("--image_column", default=None, help="the column of images (default: detected)")
    stats.add_argument(
        "--num_channels", type=int, default=None,
        help="the model's channel count: 3 reads photos as RGB (default: the first image's own channels)",
    )

    shard = commands.add_parser(
        "shard", help="write a folder of images (or of .npy files, or Parquet/Arrow files) as Parquet shards for "
        "run_mim.py --streaming",
    )
    shard.add_argument("source", help="a folder of images (class subfolders: a label column), of .npy files, or "
                       "Parquet/Arrow file(s)")
    shard.add_argument("output_dir", help="an empty folder for the shards: {split}-00000-of-0000N.parquet")
    shard.add_argument("--shard_size", default="512MB", help="about this much per shard (e.g. 512MB, 1GB)")
    shard.add_argument("--shuffle_seed", type=int, default=0, help="the rows are shuffled with it, so that each "
                       "shard mixes the classes of a folder listed class by class")
    shard.add_argument("--keep_order", action="store_true", help="keep the source's row order (no shuffle)")


def _convert(args):
    from . import convert

    if args.source == "official":
        return convert.convert_official_checkpoint(
            args.checkpoint, args.output_dir, args.allow_unsafe_pickle, **_overrides(args)
        )
    if args.source == "transformers":
        return convert.convert_transformers_checkpoint(args.model_dir, args.output_dir, **_overrides(args))
    return convert.export_checkpoint_to_transformers(args.model_dir, args.output_dir)


def _inpaint(args):
    """Fill the image's mask or box with the checkpoint's prediction; returns the written path."""
    from transformers import pipeline

    from .models.pipeline_simmim import (
        INPAINTING_TASK,
        SimMIMInpaintingPipeline,
        image_pixels,
        open_image_file,
        pixel_mask,
    )

    image = open_image_file(args.images[0])
    pixels, _ = image_pixels(image)  # the image and mask are checked before the model loads
    to_fill = pixel_mask(args.mask if args.mask is not None else args.box, *pixels.shape[:2])
    # pipeline_class: a checkpoint saved with the pipeline names it in config.json, for which transformers would
    # otherwise ask for trust_remote_code even though hf_simmim is here
    inpainter = pipeline(INPAINTING_TASK, model=args.checkpoint, pipeline_class=SimMIMInpaintingPipeline)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    inpainter(image, mask=to_fill).save(args.output)
    return args.output


def _run(args):
    """The command's work; returns the line to print."""
    if args.command == "convert":
        model = _convert(args)
        return f"Saved {type(model).__name__} ({model.config.model_type}) to {args.output_dir}"
    if args.command == "reconstruct":
        from .reporting.pictures import reconstruct_images

        return "Wrote " + reconstruct_images(
            args.checkpoint, args.images, args.output, args.mask_seed, args.display_channels, args.mask_strategy
        )
    if args.command == "inpaint":
        return "Wrote " + _inpaint(args)
    from .reporting.attention import attention_images

    return "Wrote " + attention_images(args.checkpoint, args.images, args.output)


def _stats(args):
    """`hf-simmim stats DATA`: print the statistics, and the flags that give them to run_mim.py; 2 on bad data."""
    from .data import dataset_statistics, detect_image_column, load_image_datasets

    try:
        train, _ = load_image_datasets(args.data, validation_split_percentage=0)
        column = detect_image_column(train, args.image_column)
        statistics = dataset_statistics(train, column, args.num_channels)
    except (OSError, ValueError) as error:  # no such data (nor a reachable hub dataset), or none to read
        print(f"error: {error}", file=sys.stderr)
        return 2
    channels = len(statistics.mean)
    print(f"{args.data} (column {column}): {statistics.describe()}")
    print("image_mean:", " ".join(f"{value:.8g}" for value in statistics.mean))
    print("image_std: ", " ".join(f"{value:.8g}" for value in statistics.std))
    print(
        f"run_mim.py --num_channels {channels} --image_mean {' '.join(f'{v:.8g}' for v in statistics.mean)} "
        f"--image_std {' '.join(f'{v:.8g}' for v in statistics.std)}"
    )
    return 0


def _shard(args):
    """`hf-simmim shard DIR OUT`: write the shards with a progress bar, and say how to train on them; 2 on bad input."""
    from .data.shards import write_shards

    try:
        seed = None if args.keep_order else args.shuffle_seed
        paths = write_shards(args.source, args.output_dir, args.shard_size, seed)
    except (OSError, ValueError) as error:  # no such source, nothing in it, a folder holding shards already
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {len(paths)} shard(s) to {args.output_dir}. Train on them with:")
    print(f"  python examples/run_mim.py --streaming --train_dir {args.output_dir} --max_steps N")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "stats":
        return _stats(args)
    if args.command == "shard":
        return _shard(args)
    from .convert import UnsafeCheckpointError
    from .models.pipeline_simmim import InpaintingInputError
    from .reporting.pictures import check_image_files

    try:
        problem = missing_checkpoint(*_checkpoint_argument(args))
        if problem is None:
            if args.command != "convert":
                check_image_files(args.images)
            print(_run(args))
            return 0
    except (FileNotFoundError, UnsafeCheckpointError, InpaintingInputError) as error:  # what a user fixes: no traceback
        problem = str(error)
    print(f"error: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
