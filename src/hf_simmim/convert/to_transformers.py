"""Our models out to transformers' own classes, which load wherever transformers does (no hf_simmim, no remote code):

    ours                          plain ViT (below)            any other ViT                Swin / SwinV2
    SimMIMForMaskedImageModeling  ViTForMaskedImageModeling    BeitModel (encoder only)     Swin(v2)ForMaskedImageModeling
    SimMIMModel                   BeitModel                    BeitModel                    Swin(v2)Model (no mask token)
    SimMIMForImageClassification  BeitForImageClassification   BeitForImageClassification   Swin(v2)ForImageClassification

ResNet and ConvNeXt V1 / V2 export to transformers' `ResNet` / `ConvNext` / `ConvNextV2` `Model` (from
`SimMIMModel` and, encoder only, `SimMIMForMaskedImageModeling`) and `ForImageClassification` (see `cnn_weights`),
with transformers' `ConvNextImageProcessor`, as microsoft/resnet-50 and facebook/convnext-tiny-224 ship.

A plain ViT has absolute position embeddings and no relative position bias, layer scale or mean pooling: the layout
of transformers' ViT. transformers' BEiT holds every other ViT we build, the official SimMIM variant included: a
relative position bias shared by all blocks or per block (with the same three CLS rows), layer scale, query and
value biases without a key bias, optional absolute position embeddings, and mean pooling followed by a LayerNorm.
BEiT also takes the plain ViT's encoder and classifier: transformers' ViT pools the CLS token, ours the patches.

What does not travel:
- a ViT pretraining model's decoder: transformers' `BeitForMaskedImageModeling` predicts visual tokens, not pixels;
- `pooler_output` of a ViT `SimMIMModel` without `use_mean_pooling`: BEiT's is the CLS token, ours the mean of the
  patch tokens, which is `last_hidden_state[:, 1:].mean(1)` of the export;
- the official geometric resizing of relative position tables: at another image size, transformers' BEiT
  interpolates its tables bilinearly (`interpolate_pos_encoding=True`); the export is exact at `config.image_size`;
- a pretraining model's normalised target (`norm_target`): transformers' MIM models compute their loss on the pixels
  (the reconstruction is the same);
- SwinV2 absolute position embeddings: transformers' Swinv2 cannot add them (it holds num_patches + 1 of them), so
  such a SwinV2 does not export.
transformers' Swinv2 adds the shifted-window mask (-100) twice where the official code adds it once: the same
function wherever the masked logits are negligible already after one (any logit scale below the clamp at 100).
"""

import logging
import os
import re

import torch
from safetensors.torch import save_file

from ..models.configuration_simmim import CNN_BACKBONES
from .cnn_weights import cnn_exported_state_dict, transformers_cnn_config, transformers_model_type
from .transformers_checkpoints import (
    BEIT_KEYS,
    CLASSIFIER_KEYS,
    DECODER_KEYS,
    KEY_TABLES,
    VIT_QKV,
    prefixed,
    rename_keys,
)

logger = logging.getLogger(__name__)

# transformers' class-name stem of each exported model_type, and its key tables.
_FAMILIES = {
    "vit": "ViT", "beit": "Beit", "swin": "Swin", "swinv2": "Swinv2", "resnet": "ResNet", "convnext": "ConvNext",
    "convnextv2": "ConvNextV2",
}
_KEYS = {**KEY_TABLES, "beit": (BEIT_KEYS, VIT_QKV)}
# Our weights a transformers base model cannot hold (see the module docstring).
_NOT_EXPORTED = {
    "BeitModel": re.compile(r"^decoder\."),
    "SwinModel": re.compile(r"mask_token$"),
    "Swinv2Model": re.compile(r"mask_token$"),
}
# The hierarchical backbones, exported to transformers' class of the same model_type.
_SWIN_BACKBONES = ("swin", "swinv2")
CONVNEXT_PROCESSOR_CROP_LIMIT = 384


def _vit_features_beyond_plain(config):
    """The fields of our ViT config that transformers' ViT cannot express."""
    features = [
        ("use_shared_relative_position_bias", config.use_shared_relative_position_bias),
        ("use_relative_position_bias", config.use_relative_position_bias),
        ("layer_scale_init_value", config.layer_scale_init_value),
        ("use_absolute_position_embeddings=False", not config.use_absolute_position_embeddings),
        ("use_mean_pooling", config.use_mean_pooling),
    ]
    return [name for name, present in features if present]


def _head(model):
    """"mim", "encoder" or "classifier": which of our classes `model` is."""
    from ..models.modeling_simmim import SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMModel

    heads = [
        ("mim", SimMIMForMaskedImageModeling),
        ("classifier", SimMIMForImageClassification),
        ("encoder", SimMIMModel),
    ]
    for head, model_class in heads:
        if isinstance(model, model_class):
            return head
    raise TypeError(
        f"{type(model).__name__} is not an hf_simmim model: export a SimMIMModel, SimMIMForMaskedImageModeling or "
        "SimMIMForImageClassification."
    )


def export_target(model):
    """`(model_type, class_name)`: the transformers architecture and class `model` exports to (the table above)."""
    head = _head(model)
    if model.config.backbone in CNN_BACKBONES:
        model_type = transformers_model_type(model.config)
        return model_type, _FAMILIES[model_type] + ("ForImageClassification" if head == "classifier" else "Model")
    if model.config.backbone in _SWIN_BACKBONES:
        model_type = model.config.backbone
    elif head == "mim" and not _vit_features_beyond_plain(model.config):
        model_type = "vit"
    else:
        model_type = "beit"
    family = _FAMILIES[model_type]
    if head == "classifier":
        return model_type, family + "ForImageClassification"
    if head == "mim" and model_type != "beit":
        return model_type, family + "ForMaskedImageModeling"
    return model_type, family + "Model"


def _vit_config(config):
    from transformers import ViTConfig

    unsupported = _vit_features_beyond_plain(config)
    if unsupported:
        raise ValueError(
            "transformers' ViT has no equivalent of " + ", ".join(unsupported) + ": only a plain ViT "
            "(use_absolute_position_embeddings=True, no relative position bias, layer_scale_init_value=0, no mean "
            "pooling) exports to ViT; model_type='beit' holds the others."
        )
    return ViTConfig(
        **_transformer_fields(config),
        qkv_bias=config.qkv_bias,
        encoder_stride=config.encoder_stride,
    )


def _transformer_fields(config):
    """The fields transformers' ViT and BEiT configs share with ours."""
    return dict(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=int(config.hidden_size * config.mlp_ratio),
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
    )


def _beit_config(config):
    from transformers import BeitConfig

    return BeitConfig(
        **_transformer_fields(config),
        drop_path_rate=config.drop_path_rate,
        initializer_range=config.initializer_range,
        use_mask_token=config.mask_token_type == "learned",
        use_absolute_position_embeddings=config.use_absolute_position_embeddings,
        use_relative_position_bias=config.use_relative_position_bias,
        use_shared_relative_position_bias=config.use_shared_relative_position_bias,
        layer_scale_init_value=config.layer_scale_init_value,
        use_mean_pooling=config.use_mean_pooling,
    )


def _swin_config(config):
    """transformers' `SwinConfig` or `Swinv2Config` (with the pretrained windows) of our Swin or SwinV2 config."""
    from transformers import SwinConfig, Swinv2Config

    name = "Swin" if config.backbone == "swin" else "Swinv2"
    if not config.patch_norm:
        raise ValueError(
            f"transformers' {name} always normalises the patch embedding: patch_norm=False does not export."
        )
    if config.layer_norm_eps != 1e-5:
        raise ValueError(
            f"layer_norm_eps={config.layer_norm_eps}: transformers' {name} keeps eps 1e-5 in its patch-embedding norm "
            "whatever its config says, so only layer_norm_eps=1e-5 exports exactly."
        )
    if config.backbone == "swin":
        return SwinConfig(**_swin_fields(config))
    if config.use_absolute_position_embeddings:
        raise ValueError(
            "use_absolute_position_embeddings=True: transformers' Swinv2 cannot add absolute position embeddings "
            "(it holds num_patches + 1 of them and fails on num_patches tokens), so this SwinV2 does not export."
        )
    return Swinv2Config(**_swin_fields(config), pretrained_window_sizes=list(config.pretrained_window_sizes))


def _swin_fields(config):
    """The fields transformers' Swin and Swinv2 configs share with ours."""
    return dict(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        embed_dim=config.embed_dim,
        depths=list(config.depths),
        num_heads=list(config.num_heads),
        window_size=config.window_size,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        drop_path_rate=config.drop_path_rate,
        layer_norm_eps=config.layer_norm_eps,
        use_absolute_embeddings=config.use_absolute_position_embeddings,
        encoder_stride=config.encoder_stride,
    )


def transformers_config_from_simmim(config, model_type=None):
    """Our config -> transformers' `ViTConfig`, `BeitConfig`, `SwinConfig` or `Swinv2Config` computing the same
    function, with our
    labels. `model_type` ("vit", "beit", "swin", "swinv2") defaults to the backbone's for Swin and SwinV2, "vit"
    for a plain ViT and "beit" for any other ViT; the CNNs' ("resnet", "convnext", "convnextv2") is their own; a clear
    error where the chosen architecture cannot hold the config."""
    if config.backbone in CNN_BACKBONES:
        default = transformers_model_type(config)
        allowed = (default,)
    elif config.backbone in _SWIN_BACKBONES:
        default, allowed = config.backbone, (config.backbone,)
    else:
        default, allowed = ("beit" if _vit_features_beyond_plain(config) else "vit"), ("vit", "beit")
    model_type = model_type or default
    if model_type not in allowed:
        raise ValueError(f"model_type={model_type!r}: a {config.backbone} config exports as one of {allowed}.")
    builders = {"vit": _vit_config, "beit": _beit_config, "swin": _swin_config, "swinv2": _swin_config}
    hf_config = builders.get(model_type, transformers_cnn_config)(config)
    hf_config.id2label = dict(config.id2label)
    hf_config.label2id = dict(config.label2id)
    hf_config.problem_type = config.problem_type
    return hf_config


def _to_beit_attention_biases(state_dict):
    """BEiT's attention has query and value biases and no key bias, as the official SimMIM ViT. Dropping our key bias
    is exact: it adds q . b_k to every logit of a query's row, a constant that softmax ignores. Without `qkv_bias`,
    BEiT's query and value biases are zeros."""
    for key in [k for k in state_dict if k.endswith("attention.attention.query.weight")]:
        stem = key[: -len("query.weight")]
        state_dict.pop(stem + "key.bias", None)
        weight = state_dict[key]
        for name in ("query", "value"):
            state_dict.setdefault(f"{stem}{name}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    return state_dict


def exported_state_dict(model, model_type, class_name):
    """Our weights under the on-disk names of transformers' `class_name`: the hub layout its `save_pretrained`
    writes."""
    head = _head(model)
    base, qkv = _KEYS[model_type]
    theirs = "" if class_name.endswith("Model") else model_type + "."
    ours = "" if head == "encoder" else "simmim."
    pairs = prefixed(base, theirs, ours) + {"mim": DECODER_KEYS, "classifier": CLASSIFIER_KEYS}.get(head, [])
    weights = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    not_exported = _NOT_EXPORTED.get(class_name)
    dropped = sorted(key for key in weights if not_exported and not_exported.search(key))
    if dropped:
        logger.warning(
            "%s has no place for %s: not exported (see hf_simmim.convert.to_transformers).", class_name, dropped
        )
    weights = {key: value for key, value in weights.items() if key not in dropped}
    state_dict = rename_keys(weights, pairs, prefixed([qkv], theirs, ours)[0], forward=False)
    return _to_beit_attention_biases(state_dict) if model_type == "beit" else state_dict


def transformers_image_processor(processor, model_type):
    """Our `SimMIMImageProcessor` -> transformers' own image processor of the architecture (`BeitImageProcessor`
    for BEiT, `ViTImageProcessor` for ViT and Swin, `ConvNextImageProcessor` for ResNet and ConvNeXt below 384 px, as
    the hub's checkpoints), PIL backend (no torchvision needed), doing the same: shorter side resized to
    `int(image_size / crop_pct)`, centre crop `image_size`, our filter, mean and std. One difference: transformers
    floors a half-pixel crop offset where torchvision and ours round it half to even, so an image whose resized margin
    is 3 (mod 4) pixels is cropped one pixel apart."""
    from transformers import BeitImageProcessorPil, ViTImageProcessorPil

    size = processor.image_size
    # ConvNextImageProcessor crops by crop_pct below 384 px only (above, it resizes without cropping)
    if model_type in ("resnet", "convnext", "convnextv2") and size < CONVNEXT_PROCESSOR_CROP_LIMIT:
        return _convnext_image_processor(processor)
    processor_class = BeitImageProcessorPil if model_type == "beit" else ViTImageProcessorPil
    return processor_class(
        do_resize=True,
        size={"shortest_edge": int(size / processor.crop_pct)},
        resample=processor.resample,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(processor.image_mean),
        image_std=list(processor.image_std),
    )


def _convnext_image_processor(processor):
    from transformers import ConvNextImageProcessorPil

    return ConvNextImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": processor.image_size},
        crop_pct=processor.crop_pct,
        resample=processor.resample,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(processor.image_mean),
        image_std=list(processor.image_std),
    )


def _load_every_weight(model_class, folder):
    """transformers' `from_pretrained`, refusing what it would otherwise only warn about: a weight left
    initialised at random, or one it did not use."""
    model, info = model_class.from_pretrained(folder, output_loading_info=True)
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
    problems = {kind: sorted(map(str, info[kind])) for kind in kinds if info.get(kind)}
    if problems:
        raise ValueError(f"{model_class.__name__} did not load the export in {folder} exactly: {problems}.")
    return model


def export_to_transformers(model, output_dir, image_processor=None):
    """Save an hf_simmim model as transformers' own class (see the module docstring) in the hub layout, with the
    transformers image processor of `image_processor` (by default the one of the model's config), and return it
    loaded through transformers' own `from_pretrained`, every weight checked to load."""
    import transformers

    from ..models.image_processing_simmim import SimMIMImageProcessor

    model_type, class_name = export_target(model)
    if model.config.backbone in CNN_BACKBONES:
        hf_config = transformers_config_from_simmim(model.config, model_type)
        state_dict = cnn_exported_state_dict(model, model_type, class_name)
    else:
        hf_config, state_dict = _transformer_export(model, model_type, class_name)
    hf_config.architectures = [class_name]
    processor = image_processor or SimMIMImageProcessor.from_model_config(model.config)
    os.makedirs(output_dir, exist_ok=True)
    hf_config.save_pretrained(output_dir)
    save_file(state_dict, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
    transformers_image_processor(processor, model_type).save_pretrained(output_dir)
    return _load_every_weight(getattr(transformers, class_name), output_dir)


def _transformer_export(model, model_type, class_name):
    """`(transformers config, state dict)` of our ViT, Swin or SwinV2 `model` as transformers' `class_name`."""
    if _head(model) == "mim" and model.simmim.encoder.mask_token is None:
        raise ValueError("Only a pretraining model with a learned mask token (mask_token_type='learned') exports.")
    hf_config = transformers_config_from_simmim(model.config, model_type)
    if _head(model) == "mim" and model.config.norm_target:
        logger.warning(
            "%s computes its loss on the pixels: this model's norm_target=%r does not travel (the reconstruction "
            "does).",
            class_name, model.config.norm_target,
        )
    state_dict = exported_state_dict(model, model_type, class_name)
    if model_type == "beit":
        # A classifier's encoder holds no mask token whatever mask_token_type says.
        hf_config.use_mask_token = any(key.endswith("embeddings.mask_token") for key in state_dict)
    return hf_config, state_dict


def load_simmim_checkpoint(model_dir):
    """The hf_simmim model saved in `model_dir` (folder or hub id), as the class it was saved as
    (`config.architectures`; a pretraining model where the config does not say)."""
    from ..models import modeling_simmim
    from ..models.configuration_simmim import SimMIMConfig

    saved = (SimMIMConfig.from_pretrained(model_dir).architectures or ["SimMIMForMaskedImageModeling"])[0]
    known = ("SimMIMModel", "SimMIMForMaskedImageModeling", "SimMIMForImageClassification")
    if saved not in known:
        raise ValueError(f"{model_dir} holds a {saved}, not an hf_simmim model ({', '.join(known)}).")
    return getattr(modeling_simmim, saved).from_pretrained(model_dir)


def export_checkpoint_to_transformers(model_dir, output_dir):
    """`export_to_transformers` of the model saved in `model_dir`, with its own image processor where it has one."""
    from ..models.image_processing_simmim import SimMIMImageProcessor

    model = load_simmim_checkpoint(model_dir)
    return export_to_transformers(model, output_dir, SimMIMImageProcessor.from_checkpoint(model_dir, model.config))
