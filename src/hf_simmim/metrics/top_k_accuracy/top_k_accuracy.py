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
        # rank of the true class = number of classes scoring strictly higher (ties favour the true class)
        true_scores = scores[np.arange(len(labels)), labels]
        rank = (scores > true_scores[:, None]).sum(axis=1)
        return {f"top{kk}": float((rank < kk).mean()) for kk in ks}
