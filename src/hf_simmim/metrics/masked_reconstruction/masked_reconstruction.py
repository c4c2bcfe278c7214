"""Masked reconstruction quality as an `evaluate` module that loads from a local path (no hub needed):

    metric = evaluate.load(hf_simmim.metrics.MASKED_RECONSTRUCTION)
    metric.add_batch(predictions=reconstruction, references=pixel_values, masks=bool_masked_pos)
    metric.compute()  # {"masked_l1": ..., "psnr": ...}

Inputs are normalised images (B, C, H, W) as the model sees them; masks are (B, h, w) patch masks (1 = masked)
or (B, H, W) pixel masks.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "L1 error and PSNR of a reconstruction, over the masked pixels only."
_INPUTS = """
Args:
    predictions: reconstructions, (N, C, H, W), normalised like the input.
    references: original normalised images, (N, C, H, W).
    masks: (N, h, w) patch masks or (N, H, W) pixel masks, 1 = masked; each patch covers (H/h) x (W/w) pixels.
    image_mean, image_std: the normalisation, to measure PSNR on [0, 1] pixels (default ImageNet's).
Returns:
    masked_l1: mean |prediction - reference| over masked pixels and channels, in normalised units (the SimMIM
        loss without its 1e-5).
    psnr: mean over images of 10*log10(1 / MSE) over masked pixels, after un-normalising and clipping to [0, 1].
"""

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class MaskedReconstruction(evaluate.Metric):
    def _info(self):
        image = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": image,
                    "references": image,
                    "masks": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                }
            ),
        )

    def _compute(self, predictions, references, masks, image_mean=_MEAN, image_std=_STD):
        prediction = np.asarray(predictions, dtype=np.float64)
        reference = np.asarray(references, dtype=np.float64)
        mask = np.asarray(masks, dtype=np.float64)
        if prediction.shape != reference.shape or prediction.ndim != 4:
            raise ValueError(f"predictions {prediction.shape} and references {reference.shape} must be equal (N, C, H, W).")
        n, c, h, w = prediction.shape
        if h % mask.shape[1] or w % mask.shape[2]:
            raise ValueError(f"masks of shape {mask.shape[1:]} do not tile images of {h}x{w}.")
        mask = mask.repeat(h // mask.shape[1], axis=1).repeat(w // mask.shape[2], axis=2)[:, None]  # (N, 1, H, W)
        masked = mask.sum() * c
        masked_l1 = float((np.abs(prediction - reference) * mask).sum() / masked) if masked else float("nan")
        mean = np.asarray(image_mean, dtype=np.float64).reshape(1, c, 1, 1)
        std = np.asarray(image_std, dtype=np.float64).reshape(1, c, 1, 1)
        pred01 = np.clip(prediction * std + mean, 0.0, 1.0)
        ref01 = np.clip(reference * std + mean, 0.0, 1.0)
        per_image_count = mask.reshape(n, -1).sum(axis=1) * c
        per_image_mse = ((pred01 - ref01) ** 2 * mask).reshape(n, -1).sum(axis=1) / np.maximum(per_image_count, 1)
        valid = per_image_count > 0
        psnr = 10.0 * np.log10(1.0 / np.maximum(per_image_mse[valid], 1e-10))
        return {"masked_l1": masked_l1, "psnr": float(psnr.mean()) if valid.any() else float("nan")}
