"""transformers' ResNet / ConvNext / ConvNextV2 checkpoints <-> the CNN encoders of hf_simmim: configs, weights, and
whole checkpoints in (`convert_cnn_checkpoint`, a starting point for pretraining) and out (`cnn_export`).

Below the stem our encoders keep transformers' module names, so every key converts by its prefix:

    transformers (base model)          ours (`SimMIMModel`)
    embedder.embedder.*  (ResNet)      encoder.stem.*
    embeddings.patch_embeddings.*      encoder.stem.convolution.*
    embeddings.layernorm.*             encoder.stem.normalization.*
    encoder.stages.*                   encoder.stages.*
    layernorm.*  (ConvNext, V2)        pooler.fc_norm.*   (it normalises the pooled output only)

Classifiers add `resnet.` / `convnext.` / `convnextv2.` on their side and `simmim.` on ours, and their head
(`classifier.1.*` for ResNet, `classifier.*` for ConvNext) is our `classifier.*`.

The configs map field for field (`config_from_transformers_cnn`, `transformers_cnn_config`); transformers' ConvNext
`layer_norm_eps` is the eps of its final norm only, as ours. Not representable, hence refused: a ResNet that
downsamples in its first stage or in the bottleneck's 1x1 convolution (`downsample_in_first_stage`,
`downsample_in_bottleneck`), which no published checkpoint does.
"""

import logging
import re

import torch

from ..models.configuration_simmim import CNN_PRETRAINING, SimMIMConfig
from .common import save_with_processor

logger = logging.getLogger(__name__)

TRANSFORMERS_MODEL_TYPES = ("resnet", "convnext", "convnextv2")
RESNET_PREFIXES = [("embedder.embedder.", "encoder.stem."), ("encoder.stages.", "encoder.stages.")]
CONVNEXT_PREFIXES = [
    ("embeddings.patch_embeddings.", "encoder.stem.convolution."),
    ("embeddings.layernorm.", "encoder.stem.normalization."),
    ("encoder.stages.", "encoder.stages."),
    ("layernorm.", "pooler.fc_norm."),
]
CLASSIFIER_PREFIXES = {
    "resnet": ("classifier.1.", "classifier."),
    "convnext": ("classifier.", "classifier."),
    "convnextv2": ("classifier.", "classifier."),
}
# Ours that transformers' models cannot hold: the encoder's mask token and the pretraining decoder.
NOT_EXPORTED = re.compile(r"(^|\.)encoder\.mask_token$|^decoder\.")


def _check_model_type(model_type):
    if model_type not in TRANSFORMERS_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: CNN weights convert for {TRANSFORMERS_MODEL_TYPES} only.")


def prefix_pairs(model_type, classifier):
    """`(transformers prefix, our prefix)` pairs of a base model, or of an image classifier (`classifier=True`)."""
    _check_model_type(model_type)
    base = RESNET_PREFIXES if model_type == "resnet" else CONVNEXT_PREFIXES
    if not classifier:
        return list(base)
    return [(f"{model_type}.{theirs}", f"simmim.{ours}") for theirs, ours in base] + [CLASSIFIER_PREFIXES[model_type]]


def rename_prefixes(state_dict, pairs):
    """Rename each key by the first pair whose prefix starts it; a key no pair matches raises `ValueError`."""
    renamed, unmatched = {}, []
    for key, value in state_dict.items():
        for source, target in pairs:
            if key.startswith(source):
                renamed[target + key[len(source) :]] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(
            f"Unrecognised weights: {sorted(unmatched)[:8]}{' ...' if len(unmatched) > 8 else ''}; expected keys "
            f"starting with {sorted({source for source, _ in pairs})}."
        )
    return renamed


def cnn_state_dict_from_transformers(state_dict, model_type):
    """A transformers `ResNet/ConvNext/ConvNextV2` `Model` or `ForImageClassification` state dict -> ours:
    `SimMIMModel` keys for a base model, `SimMIMForImageClassification` keys for a classifier (told apart by the
    `{model_type}.` prefix of its base model). transformers' models hold no mask token: a pretraining model
    initialises its own."""
    classifier = any(key.startswith(f"{model_type}.") for key in state_dict)
    return rename_prefixes(state_dict, prefix_pairs(model_type, classifier))


def cnn_state_dict_to_transformers(state_dict, model_type):
    """Our `SimMIMModel`, `SimMIMForImageClassification` or `SimMIMForMaskedImageModeling` state dict -> the
    transformers `Model` (no `classifier.` head among ours) or `ForImageClassification` of `model_type`.

    Returns the converted state dict and the keys left out, which transformers' models cannot hold (the mask token,
    the pretraining decoder). A pretraining model has no pooler: for ConvNext its export lacks `layernorm.*`."""
    dropped = sorted(key for key in state_dict if NOT_EXPORTED.search(key))
    kept = {key: value for key, value in state_dict.items() if not NOT_EXPORTED.search(key)}
    classifier = any(key.startswith("classifier.") for key in kept)
    if not classifier:
        kept = {key.removeprefix("simmim."): value for key, value in kept.items()}
    pairs = [(ours, theirs) for theirs, ours in prefix_pairs(model_type, classifier)]
    return rename_prefixes(kept, pairs), dropped


# ---------------------------------------------------------------------------------------------- configs
def transformers_model_type(config):
    """The transformers model_type holding our CNN config: "resnet", "convnext" (V1) or "convnextv2"."""
    if config.backbone == "resnet":
        return "resnet"
    return "convnextv2" if config.convnext_version == 2 else "convnext"


def _cnn_fields(c):
    """Our encoder fields of a transformers ResNet / ConvNext / ConvNextV2 config dict."""
    fields = dict(
        num_channels=c.get("num_channels", 3), hidden_sizes=list(c["hidden_sizes"]), depths=list(c["depths"]),
        hidden_act=c.get("hidden_act"), image_size=c.get("image_size", 224),
    )
    if c["model_type"] == "resnet":
        refused = [name for name in ("downsample_in_first_stage", "downsample_in_bottleneck") if c.get(name)]
        if refused:
            raise ValueError(
                f"{', '.join(refused)}=True: hf_simmim's ResNet downsamples in the 3x3 convolution of each later "
                "stage's first layer (microsoft/resnet-50's layout); this checkpoint computes another function."
            )
        # transformers' ResNet has no stochastic depth: none here either, unless `overrides` ask for it
        return dict(
            fields, backbone="resnet", embedding_size=c["embedding_size"], layer_type=c["layer_type"], drop_path_rate=0.0
        )
    if len(c["depths"]) != c.get("num_stages", len(c["depths"])):
        raise ValueError(f"num_stages={c['num_stages']} does not match depths={c['depths']}.")
    version = 2 if c["model_type"] == "convnextv2" else 1
    return dict(
        fields, backbone="convnext", convnext_version=version, patch_size=c.get("patch_size", 4),
        layer_norm_eps=c.get("layer_norm_eps", 1e-12), drop_path_rate=c.get("drop_path_rate", 0.0),
        layer_scale_init_value=c.get("layer_scale_init_value", 1e-6) if version == 1 else 0.0,
        initializer_range=c.get("initializer_range", 0.02),
    )


def config_from_transformers_cnn(hf_config, **overrides):
    """A transformers ResNet / ConvNext / ConvNextV2 config (dict or object) -> `SimMIMConfig` with the same encoder,
    set up to pretrain as SparK / FCMAE (`CNN_PRETRAINING`: sparse masking, hierarchical decoder, L2 on the
    normalised 32 px squares), with the config's labels; `overrides` win."""
    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    pretraining = {key: value for key, value in CNN_PRETRAINING.items() if key != "drop_path_rate"}
    labels = {key: c[key] for key in ("id2label", "label2id") if c.get(key)}
    return SimMIMConfig(**{**pretraining, **_cnn_fields(c), **labels, **overrides})


def transformers_cnn_config(config):
    """Our CNN config -> transformers' `ResNetConfig`, `ConvNextConfig` or `ConvNextV2Config` of the same encoder."""
    from transformers import ConvNextConfig, ConvNextV2Config, ResNetConfig

    fields = dict(
        num_channels=config.num_channels, hidden_sizes=list(config.hidden_sizes), depths=list(config.depths),
        hidden_act=config.hidden_act,
    )
    if config.backbone == "resnet":
        if config.drop_path_rate:
            logger.warning(
                "transformers' ResNet has no stochastic depth: the export leaves out drop_path_rate=%s (the same "
                "model at inference; fine-tune the hf_simmim checkpoint to train with it).", config.drop_path_rate,
            )
        return ResNetConfig(**fields, embedding_size=config.embedding_size, layer_type=config.layer_type)
    fields.update(
        patch_size=config.patch_size, num_stages=len(config.depths), layer_norm_eps=config.layer_norm_eps,
        drop_path_rate=config.drop_path_rate, initializer_range=config.initializer_range, image_size=config.image_size,
    )
    if config.convnext_version == 2:
        return ConvNextV2Config(**fields)
    return ConvNextConfig(**fields, layer_scale_init_value=config.layer_scale_init_value)


# ---------------------------------------------------------------------------------------------- checkpoints
def convert_cnn_checkpoint(model_dir, hf_config, state_dict, output_dir=None, **overrides):
    """transformers' ResNet / ConvNext / ConvNextV2 `Model` or `ForImageClassification` weights (`hf_config`,
    `state_dict` of the folder `model_dir`) -> our `SimMIMForMaskedImageModeling`, the encoder loaded and the decoder
    (and mask token) new: a starting point for pretraining. What a pretraining model has no place for is logged:
    a classifier's head, ConvNext's final norm (our pooler's; FCMAE pretrains without it)."""
    from ..models.modeling_simmim import SimMIMForMaskedImageModeling

    model_type = hf_config["model_type"]
    config = config_from_transformers_cnn(hf_config, **overrides)
    converted = cnn_state_dict_from_transformers(state_dict, model_type)
    base = {key.removeprefix("simmim."): value for key, value in converted.items()}
    kept = {"simmim." + key: value for key, value in base.items() if key.startswith("encoder.")}
    left_out = sorted(key for key in base if not key.startswith("encoder."))
    if left_out:
        logger.warning("%s: a pretraining model has no place for %s: not converted.", model_dir, left_out)
    model = SimMIMForMaskedImageModeling(config)
    missing, unexpected = model.load_state_dict(kept, strict=False)
    new = sorted(key for key in missing if not key.startswith("decoder.") and not key.endswith("mask_token"))
    if new or unexpected:
        raise ValueError(
            f"{model_dir} does not match the inferred architecture: missing {new}, unexpected {unexpected}."
        )
    if output_dir is not None:
        save_with_processor(model, output_dir)
    return model


def cnn_exported_state_dict(model, model_type, class_name):
    """Our CNN `model`'s weights as transformers' `class_name` holds them. What transformers' models cannot hold (the
    mask token, the pretraining decoder) is left out and logged; a ConvNext export of a model without our pooler
    (pretraining) gets a fresh final norm (weight 1, bias 0), as transformers would initialise it."""
    weights = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    state_dict, dropped = cnn_state_dict_to_transformers(weights, model_type)
    if dropped:
        logger.warning("%s has no place for %s: not exported.", class_name, dropped)
    norm = "layernorm." if class_name.endswith("Model") else f"{model_type}.layernorm."
    if model_type != "resnet" and norm + "weight" not in state_dict:
        logger.warning(
            "%s: the model has no final norm (a pretraining model has no pooler); exported as a fresh one.", class_name
        )
        width = model.config.hidden_size
        state_dict.update({norm + "weight": torch.ones(width), norm + "bias": torch.zeros(width)})
    return state_dict
