"""Pictures (reconstruction grids, loss curves) and model cards of a run."""
