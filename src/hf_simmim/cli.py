"""The `hf-simmim` command: convert checkpoints, and draw reconstructions and attention maps.

    hf-simmim convert official CHECKPOINT.pth OUTPUT_DIR [--allow-unsafe-pickle] [--image_size N ...]
    hf-simmim convert transformers MODEL_DIR OUTPUT_DIR
    hf-simmim convert to-transformers SIMMIM_DIR OUTPUT_DIR
    hf-simmim reconstruct CHECKPOINT IMAGE... --output grid.png
    hf-simmim attention CHECKPOINT IMAGE... --output map.png

A checkpoint that does not exist (no such local path, nor hub model id) or a missing image ends with a one-line
error and exit status 2, before anything is loaded.
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


def build_parser():
    parser = argparse.ArgumentParser(prog="hf-simmim", description="SimMIM for Hugging Face transformers.")
    commands = parser.add_subparsers(dest="command", required=True)

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
    hf = sources.add_parser("transformers", help="a transformers ViT/Swin ForMaskedImageModeling folder")
    hf.add_argument("model_dir")
    hf.add_argument("output_dir")
    _add_overrides(hf)
    export = sources.add_parser("to-transformers", help="export an hf_simmim ViT/Swin MIM checkpoint to transformers")
    export.add_argument("model_dir")
    export.add_argument("output_dir")

    reconstruct = commands.add_parser("reconstruct", help="draw a reconstruction grid for images")
    reconstruct.add_argument("checkpoint")
    reconstruct.add_argument("images", nargs="+")
    reconstruct.add_argument("--output", default="reconstruction.png")
    reconstruct.add_argument("--mask_seed", type=int, default=0)

    attention = commands.add_parser(
        "attention",
        help="draw the last block's attention over images (ViT: the CLS token's; Swin: received, per window)",
    )
    attention.add_argument("checkpoint")
    attention.add_argument("images", nargs="+")
    attention.add_argument("--output", default="attention.png")
    return parser


def _convert(args):
    from . import convert

    if args.source == "official":
        return convert.convert_official_checkpoint(
            args.checkpoint, args.output_dir, args.allow_unsafe_pickle, **_overrides(args)
        )
    if args.source == "transformers":
        return convert.convert_transformers_checkpoint(args.model_dir, args.output_dir, **_overrides(args))
    return convert.export_checkpoint_to_transformers(args.model_dir, args.output_dir)


def _run(args):
    """The command's work; returns the line to print."""
    if args.command == "convert":
        model = _convert(args)
        return f"Saved {type(model).__name__} ({model.config.model_type}) to {args.output_dir}"
    if args.command == "reconstruct":
        from .reporting.pictures import reconstruct_images

        return "Wrote " + reconstruct_images(args.checkpoint, args.images, args.output, mask_seed=args.mask_seed)
    from .reporting.attention import attention_images

    return "Wrote " + attention_images(args.checkpoint, args.images, args.output)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .convert import UnsafeCheckpointError
    from .reporting.pictures import check_image_files

    try:
        problem = missing_checkpoint(*_checkpoint_argument(args))
        if problem is None:
            if args.command != "convert":
                check_image_files(args.images)
            print(_run(args))
            return 0
    except (FileNotFoundError, UnsafeCheckpointError) as error:  # what a user fixes: no traceback
        problem = str(error)
    print(f"error: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
