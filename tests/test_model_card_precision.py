"""The model card's precision is the one training ran in: a forward hook records whether torch autocast was on
(and in which dtype) during the training step, and the card must say the same, however mixed precision was asked
for (`bf16=True`, also with `use_cpu=True`, or accelerate's ACCELERATE_MIXED_PRECISION, which leaves `bf16` False)."""

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import Trainer, TrainingArguments

from hf_simmim.reporting.model_card import training_precision


class RecordsAutocast(torch.nn.Module):
    """A linear layer whose forward notes the autocast state it runs under."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.autocast_dtypes = []

    def forward(self, x):
        enabled = torch.is_autocast_enabled("cpu")
        self.autocast_dtypes.append(torch.get_autocast_dtype("cpu") if enabled else None)
        return {"loss": self.linear(x.to(self.linear.weight.dtype)).float().pow(2).mean()}


def train_one_step(tmp_path, model=None, **arguments):
    AcceleratorState._reset_state(reset_partial_state=True)  # each Trainer sets its own mixed precision
    model = model or RecordsAutocast()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, max_steps=1, per_device_train_batch_size=2, report_to="none",
        save_strategy="no", **arguments,
    )
    trainer = Trainer(model=model, args=args, train_dataset=[{"x": torch.randn(4)} for _ in range(2)])
    trainer.train()
    return trainer, model


@pytest.mark.parametrize("environment", [{}, {"ACCELERATE_MIXED_PRECISION": "bf16"}])
def test_a_run_under_bf16_autocast_says_bf16_mixed_precision(tmp_path, monkeypatch, environment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    trainer, model = train_one_step(tmp_path, bf16=not environment)
    assert model.autocast_dtypes == [torch.bfloat16]
    assert trainer.args.bf16 is not bool(environment)  # the environment variable leaves the flag False
    assert training_precision(trainer, model) == "bf16 mixed precision"


def test_a_run_without_autocast_names_the_dtype_of_its_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    trainer, model = train_one_step(tmp_path)
    assert model.autocast_dtypes == [None]
    assert training_precision(trainer, model) == "fp32"
    trainer, model = train_one_step(tmp_path, model=RecordsAutocast().to(torch.bfloat16))
    assert model.autocast_dtypes == [None]
    assert training_precision(trainer, model) == "bf16"
