"""What every conversion shares: buffers derived from the config, strict loading, saving with an image processor."""

import re

# Buffers the official and transformers code keep in their state dicts; ours are computed from the config.
DERIVED_BUFFERS = re.compile(r"(relative_position_index|relative_coords_table|attn_mask|position_ids)$")


def load_strict(model, state_dict, source, allow_missing_decoder=False):
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if allow_missing_decoder:
        missing = [k for k in missing if not k.startswith("decoder.")]
    if missing or unexpected:
        raise ValueError(f"{source} does not match the inferred architecture: missing {missing}, unexpected {unexpected}.")


def save_with_processor(model, output_dir):
    from ..models.image_processing_simmim import SimMIMImageProcessor

    model.save_pretrained(output_dir)
    SimMIMImageProcessor.from_model_config(model.config).save_pretrained(output_dir)
