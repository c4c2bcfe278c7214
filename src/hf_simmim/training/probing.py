"""Frozen-encoder evaluation: linear probing and k-NN on average-pooled patch tokens of a chosen block.

The paper's linear-probe protocol for ViT-B takes the average-pooled patch tokens of the 8th block. Features are
extracted once, standardised with the training set's statistics (a BatchNorm without affine parameters, as MAE's
probe), and a linear classifier is trained on them; k-NN votes among the nearest training features by cosine
similarity, weighted by `exp(sim / T)` (the DINO protocol).
"""

import functools
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from .. import metrics
from ..data.transforms import collate_fn
from .finetuning import accuracy_ks
from ..models.modeling_simmim import SimMIMModel
from .runs import parse_config_overrides, skipped_image_counts


def pooled_features(model, pixel_values, block=None):
    """Average-pooled patch tokens after `block` ViT blocks / Swin, ResNet or ConvNeXt stages (default: the last).

    `model` is a `SimMIMModel` (or any model whose `.simmim` is one). ViT's CLS token is left out; a CNN stage's
    `(B, C, h, w)` map counts as `h * w` tokens.
    """
    encoder_model = getattr(model, "simmim", model)
    config = encoder_model.config
    depth = config.num_hidden_layers if config.backbone == "vit" else len(config.depths)
    block = depth if block is None else block
    if not 1 <= block <= depth:
        raise ValueError(f"block={block} must lie in 1..{depth} ({'blocks' if config.backbone == 'vit' else 'stages'}).")
    outputs = encoder_model(pixel_values, output_hidden_states=True, return_dict=True)
    # input of block `block` = output of the first `block` blocks (stages)
    return encoder_model.encoder.patch_tokens(outputs.hidden_states[block]).mean(dim=1)


@torch.no_grad()
def extract_features(model, dataloader, block=None, device=None):
    """Run a frozen encoder over a dataloader of `pixel_values`/`labels` batches -> `(features, labels)` tensors."""
    device = device or next(model.parameters()).device
    model.eval()
    features, labels = [], []
    for batch in dataloader:
        features.append(pooled_features(model, batch["pixel_values"].to(device), block).float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(features), torch.cat(labels)


def standardise(train, *others, eps=1e-6):
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True) + eps
    return [(x - mean) / std for x in (train, *others)]


def linear_probe(train_features, train_labels, test_features, num_classes, epochs=100, lr=1e-2,
                 weight_decay=0.0, batch_size=256, seed=0):
    """Train a linear classifier on standardised frozen features; return test logits `(N_test, num_classes)`."""
    train_x, test_x = standardise(train_features, test_features)
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], num_classes)
    torch.nn.init.trunc_normal_(head.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, int(np.ceil(len(train_x) / batch_size)))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(train_x), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(head(train_x[index]), train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        return head(test_x)


def knn_scores(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07, chunk=1024):
    """Weighted k-NN class scores `(N_test, num_classes)`: each of the k most cosine-similar training features
    votes for its class with weight `exp(similarity / temperature)`."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(test), chunk):
        similarity = test[start : start + chunk] @ train.T
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes)
        votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def load_frozen_encoder(model_args, classifier):
    """The encoder a probe reads: the checkpoint's `SimMIMModel` with its final norm, at the resolution the
    config overrides ask for; from scratch, the (randomly initialised) encoder of `classifier`."""
    if model_args.from_scratch:
        return classifier.simmim
    overrides = parse_config_overrides(model_args.config_overrides)
    return SimMIMModel.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir, **overrides)


def evaluate_frozen_encoder(model_args, training_args, encoder, datasets, num_classes):
    """`--mode linear_probe | knn`: features of the frozen `encoder` for the training and evaluation
    `SeededImageDataset`s, then a linear probe or k-NN; top-k accuracies as `eval_top*` (written to
    `all_results.json` by the main process) with the skipped-image counts."""
    loader = functools.partial(
        torch.utils.data.DataLoader,
        batch_size=training_args.per_device_eval_batch_size,
        collate_fn=collate_fn,
        num_workers=training_args.dataloader_num_workers,
    )
    device = training_args.device
    encoder.to(device)
    train_x, train_y = extract_features(encoder, loader(datasets[0]), model_args.probe_block, device)
    test_x, test_y = extract_features(encoder, loader(datasets[1]), model_args.probe_block, device)
    if model_args.mode == "knn":
        scores = knn_scores(train_x, train_y, test_x, num_classes, model_args.knn_k, model_args.knn_temperature)
    else:
        scores = linear_probe(
            train_x, train_y, test_x, num_classes, epochs=model_args.probe_epochs, lr=model_args.probe_learning_rate,
            seed=training_args.seed,
        )
    accuracy = metrics.load("top_k_accuracy").compute(
        predictions=scores.numpy(), references=test_y.numpy(), k=accuracy_ks(num_classes)
    )
    results = {**{f"eval_{k}": v for k, v in accuracy.items()}, **skipped_image_counts(*datasets)}
    if training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "all_results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
    return results
