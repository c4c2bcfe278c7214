"""Top-k accuracy as an `evaluate` module that loads from a local path (no hub needed):

    metric = evaluate.load(hf_simmim.metrics.TOP_K_ACCURACY)
    metric.compute(predictions=logits, references=labels, k=(1, 5))  # {"top1": ..., "top5": ...}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of examples whose label is among the k highest-scoring classes, for each requested k."
_INPUTS = """
Args:
    predictions: per-example class scores (logits or probabilities), shape (N, num_classes).
    references: integer labels, shape (N,).
    k: an int or a sequence of ints (default (1, 5)); a k larger than num_classes counts every example as correct.
    Ties are broken as argmax breaks them (the lower class index ranks first).
Returns:
    {"top{k}": float} for every k.
"""


class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
            raise ValueError(f"predictions must be (N, num_classes) scores for N={labels.shape[0]} references.")
        ks = (k,) if isinstance(k, int) else tuple(k)
        # rank of the true class = classes scoring higher, plus equal-scoring classes of a lower index (ties are
        # broken as argmax breaks them, so constant logits do not count as correct)
        true_scores = scores[np.arange(len(labels)), labels][:, None]
        lower_index = np.arange(scores.shape[1])[None, :] < labels[:, None]
        rank = ((scores > true_scores) | ((scores == true_scores) & lower_index)).sum(axis=1)
        valid = ~np.isnan(scores).any(axis=1)  # NaN scores (a diverged model) compare False: never count them
        return {f"top{kk}": float(((rank < kk) & valid).mean()) for kk in ks}
