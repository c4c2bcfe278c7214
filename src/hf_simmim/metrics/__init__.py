"""`evaluate` modules shipped with the package, loaded by local path (`evaluate.load` of a hub metric needs a
network): `evaluate.load(hf_simmim.metrics.TOP_K_ACCURACY)`, `evaluate.load(hf_simmim.metrics.MASKED_RECONSTRUCTION)`."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
TOP_K_ACCURACY = os.path.join(_HERE, "top_k_accuracy", "top_k_accuracy.py")
MASKED_RECONSTRUCTION = os.path.join(_HERE, "masked_reconstruction", "masked_reconstruction.py")


def load(name, **kwargs):
    """`evaluate.load` of a shipped module by short name: "top_k_accuracy" or "masked_reconstruction"."""
    import evaluate

    paths = {"top_k_accuracy": TOP_K_ACCURACY, "masked_reconstruction": MASKED_RECONSTRUCTION}
    if name not in paths:
        raise ValueError(f"Unknown metric {name!r}: choose one of {sorted(paths)}.")
    return evaluate.load(paths[name], **kwargs)
