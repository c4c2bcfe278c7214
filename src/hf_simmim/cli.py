"""The `hf-simmim` command: convert checkpoints, and draw reconstructions.

    hf-simmim convert official CHECKPOINT.pth OUTPUT_DIR [--allow-unsafe-pickle] [--image_size N ...]
    hf-simmim convert transformers MODEL_DIR OUTPUT_DIR
    hf-simmim convert to-transformers SIMMIM_DIR OUTPUT_DIR
    hf-simmim reconstruct CHECKPOINT IMAGE... --output grid.png
"""

import argparse
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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from . import convert

        if args.source == "official":
            try:
                model = convert.convert_official_checkpoint(
                    args.checkpoint, args.output_dir, args.allow_unsafe_pickle, **_overrides(args)
                )
            except convert.UnsafeCheckpointError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
        elif args.source == "transformers":
            model = convert.convert_transformers_checkpoint(args.model_dir, args.output_dir, **_overrides(args))
        else:
            from .models.modeling_simmim import SimMIMForMaskedImageModeling

            source = SimMIMForMaskedImageModeling.from_pretrained(args.model_dir)
            model = convert.export_to_transformers(source, args.output_dir)
        print(f"Saved {type(model).__name__} ({model.config.model_type}) to {args.output_dir}")
        return 0
    if args.command == "reconstruct":
        from .reporting.pictures import reconstruct_images

        path = reconstruct_images(args.checkpoint, args.images, args.output, mask_seed=args.mask_seed)
        print(f"Wrote {path}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
