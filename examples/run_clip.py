#!/usr/bin/env python
r"""A SimMIM-pretrained encoder as the image tower of a CLIP-style text-image model, on `transformers.Trainer`.

    python examples/run_clip.py              # bundled CIFAR-10 sample, both vision towers, a few minutes on 2 CPUs
    python examples/run_clip.py --vision_model_name_or_path outputs/swin --dataset_name PATH --num_train_epochs 30

Trains transformers' `VisionTextDualEncoderModel` contrastively (its CLIP loss): the image tower is the SimMIM
encoder of --vision_model_name_or_path (`SimMIMModel`, whose pooled patch tokens are projected), the text tower a
small BERT built from config over a WordPiece tokenizer trained on the captions. Captions are made from the class
labels with --caption_template ("a photo of a cat."). Then the held-out images are classified zero-shot through
transformers' `zero-shot-image-classification` pipeline (the template as prompt, the class names as candidates),
and the same run is repeated from a randomly initialised vision tower (--skip_random_tower skips it).

The default --vision_model_name_or_path is the output of `python examples/run_mim.py`; when it holds no checkpoint,
that command is run first (about half a minute on 2 CPUs). Writes to --output_dir: simmim-tower/ and random-tower/
(model, tokenizer and image processor, for `from_pretrained` after `import hf_simmim`) and zero_shot_results.json.
"""

import json
import logging
import os
import sys
from pathlib import Path

from transformers import VisionTextDualEncoderProcessor

from hf_simmim.models import SimMIMImageProcessor
from hf_simmim.training.arguments import DEFAULT_OUTPUT_DIR
from hf_simmim.training.contrastive import (
    TOWERS,
    CaptionCollator,
    captioned_datasets,
    dual_encoder,
    ensure_checkpoint,
    held_out_images,
    load_vision_config,
    parse_contrastive_arguments,
    train_caption_tokenizer,
    train_dual_encoder,
    zero_shot_accuracy,
)
from hf_simmim.training.distributed import end_distributed_run
from hf_simmim.training.runs import load_run_datasets, start_run

logger = logging.getLogger("run_clip")
PRETRAINING_SCRIPT = Path(__file__).resolve().with_name("run_mim.py")


def main(argv=None):
    model_args, data_args, training_args = parse_contrastive_arguments(argv, description=__doc__)
    start_run(training_args)

    # ---------------------------------------------------------------- the image tower's SimMIM checkpoint
    vision_path = model_args.vision_model_name_or_path
    pretraining = [sys.executable, str(PRETRAINING_SCRIPT), "--output_dir", vision_path]
    ensure_checkpoint(vision_path, vision_path == DEFAULT_OUTPUT_DIR, pretraining, training_args)
    vision_config = load_vision_config(vision_path)
    image_processor = SimMIMImageProcessor.from_checkpoint(vision_path, vision_config)

    # ---------------------------------------------------------------- captioned images, a tokenizer for the captions
    raw_datasets = load_run_datasets(data_args, training_args)
    datasets, image_column, names, captions = captioned_datasets(
        raw_datasets, image_processor, data_args, training_args.seed
    )
    tokenizer = train_caption_tokenizer(captions)
    processor = VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)
    images, labels = held_out_images(raw_datasets[1], image_column, data_args.label_column_name, datasets[1].rows)
    logger.info("%d training images, %d held-out; captions like %r.", len(datasets[0]), len(images), captions[0])

    # ---------------------------------------------------------------- each vision tower: train, save, zero-shot
    results = {}
    for tower in TOWERS[: 1 if model_args.skip_random_tower else 2]:
        model = dual_encoder(vision_path, vision_config, tokenizer, model_args, training_args.seed, tower == "random")
        output_dir = os.path.join(training_args.output_dir, f"{tower}-tower")
        trained = train_dual_encoder(model, processor, training_args, datasets, CaptionCollator(tokenizer, captions),
                                     output_dir)
        accuracy = zero_shot_accuracy(model, processor, images, labels, names, data_args.caption_template)
        results[tower] = {"output_dir": output_dir, "train_loss": trained.training_loss,
                          "train_runtime": trained.metrics["train_runtime"], **accuracy}
    if training_args.process_index == 0:
        with open(os.path.join(training_args.output_dir, "zero_shot_results.json"), "w", encoding="utf-8") as handle:
            json.dump({"vision_model": vision_path, "held_out_images": len(images), **results}, handle, indent=2)
        print_summary(vision_path, results, len(images), len(names))
    return 0


def print_summary(vision_path, results, num_images, num_classes):
    lines = ["", "=" * 78, f"Zero-shot accuracy on {num_images} held-out images, {num_classes} classes:"]
    for tower, result in results.items():
        source = f"SimMIM-pretrained ({vision_path})" if tower == "simmim" else "randomly initialised"
        accuracies = ", ".join(f"{key} {value:.3f}" for key, value in result.items() if key.startswith("top"))
        lines.append(f"  vision tower {source}: {accuracies} (train loss {result['train_loss']:.3f}, "
                     f"{result['train_runtime']:.0f} s)  -> {result['output_dir']}")
    lines += [
        "Load it:",
        "  import hf_simmim; from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor",
        f"  model = VisionTextDualEncoderModel.from_pretrained({results['simmim']['output_dir']!r})",
        f"  processor = VisionTextDualEncoderProcessor.from_pretrained({results['simmim']['output_dir']!r})",
        "Classify zero-shot (transformers logs that the model is not in the task's list; the pipeline runs it):",
        f"  pipeline('zero-shot-image-classification', model={results['simmim']['output_dir']!r})"
        "(image, candidate_labels=[...], hypothesis_template=...)",
        "=" * 78,
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    exit_code = main()
    end_distributed_run()  # once main's objects are gone
    sys.exit(exit_code)
