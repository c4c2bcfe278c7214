"""Weights of transformers' ResNet / ConvNext / ConvNextV2 models <-> the CNN encoders of hf_simmim (key names only).

Below the stem our encoders keep transformers' module names, so every key converts by its prefix:

    transformers (base model)          ours (`SimMIMModel`)
    embedder.embedder.*  (ResNet)      encoder.stem.*
    embeddings.patch_embeddings.*      encoder.stem.convolution.*
    embeddings.layernorm.*             encoder.stem.normalization.*
    encoder.stages.*                   encoder.stages.*
    layernorm.*  (ConvNext, V2)        pooler.fc_norm.*   (it normalises the pooled output only)

Classifiers add `resnet.` / `convnext.` / `convnextv2.` on their side and `simmim.` on ours, and their head
(`classifier.1.*` for ResNet, `classifier.*` for ConvNext) is our `classifier.*`.
"""

import re

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
