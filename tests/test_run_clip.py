"""examples/run_clip.py end to end on the bundled sample (tiny towers, a few steps): the SimMIM encoder as the
image tower of transformers' VisionTextDualEncoderModel, saved and reloaded, and classified zero-shot through
transformers' pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor, pipeline

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMImageProcessor
from hf_simmim.data import bundled_sample_data_files

from conftest import free_port, load_script, perturb_parameters_, tiny_swin, tiny_vit

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HELD_OUT = 12
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "16", "--max_train_samples", "48",
        "--max_eval_samples", str(HELD_OUT), "--text_hidden_size", "16", "--text_num_hidden_layers", "1",
        "--projection_dim", "8", "--logging_steps", "1"]


def _checkpoint(path, fields):
    """A SimMIM pretraining checkpoint whose weights no initialisation draws (perturbed), with its processor."""
    config = SimMIMConfig(**fields)
    torch.manual_seed(0)
    perturb_parameters_(SimMIMForMaskedImageModeling(config)).save_pretrained(path)
    SimMIMImageProcessor.from_model_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("simmim-vit"), tiny_vit())


def _run(checkpoint, out, *extra, monkeypatch=None):
    """Run the script's main; return the trained models by tower (captured as main hands them to the Trainer)."""
    script = load_script("examples/run_clip.py")
    trained, train = [], script.train_dual_encoder

    def keep_and_train(model, *args):
        trained.append(model)
        return train(model, *args)

    if monkeypatch is not None:
        monkeypatch.setattr(script, "train_dual_encoder", keep_and_train)
    assert script.main(["--vision_model_name_or_path", str(checkpoint), "--output_dir", str(out), *FAST, *extra]) == 0
    return trained


def _held_out_images():
    import datasets

    validation = datasets.load_dataset("parquet", data_files=bundled_sample_data_files())["validation"]
    rows = validation.select(range(HELD_OUT))
    return list(rows["image"]), list(rows["label"])


def test_run_clip_saves_reloadable_models_and_reports_zero_shot_accuracy(vit_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "clip"
    trained_models = _run(vit_checkpoint, out, monkeypatch=monkeypatch)
    results = json.loads((out / "zero_shot_results.json").read_text())
    assert results["held_out_images"] == HELD_OUT
    images, labels = _held_out_images()
    captions = [f"a photo of a {name}." for name in CLASSES]
    for tower, trained in zip(("simmim", "random"), trained_models):
        assert 0.0 <= results[tower]["top1"] <= results[tower]["top5"] <= 1.0
        folder = out / f"{tower}-tower"
        model = VisionTextDualEncoderModel.from_pretrained(folder).eval()
        processor = VisionTextDualEncoderProcessor.from_pretrained(folder)
        inputs = processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            reloaded, original = model(**inputs), trained.eval()(**inputs)
        torch.testing.assert_close(reloaded.image_embeds, original.image_embeds)
        torch.testing.assert_close(reloaded.text_embeds, original.text_embeds)
        # the reported accuracy is the reloaded model's own: the caption scoring highest for each image
        top1 = (reloaded.logits_per_image.argmax(dim=1) == torch.tensor(labels)).float().mean().item()
        assert results[tower]["top1"] == pytest.approx(top1)

    # transformers' pipeline, loading everything from the saved folder: one score per class, summing to 1
    classifier = pipeline("zero-shot-image-classification", model=str(out / "simmim-tower"))
    scores = classifier(images[0], candidate_labels=CLASSES, hypothesis_template="a photo of a {}.")
    assert sorted(entry["label"] for entry in scores) == sorted(CLASSES)
    assert sum(entry["score"] for entry in scores) == pytest.approx(1.0, abs=1e-5)


def _encoder_weights(checkpoint):
    """The encoder of a pretraining checkpoint, read from its file: `simmim.*` without the prefix."""
    weights = load_file(checkpoint / "model.safetensors")
    return {key.removeprefix("simmim."): value for key, value in weights.items() if key.startswith("simmim.")}


def _tower(folder, prefix):
    weights = load_file(folder / "model.safetensors")
    return {key.removeprefix(prefix): value for key, value in weights.items() if key.startswith(prefix)}


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_vision_tower_starts_from_the_simmim_encoder(backbone, vit_checkpoint, tmp_path):
    """With a zero learning rate the saved towers are those the runs start from."""
    checkpoint = vit_checkpoint if backbone == "vit" else _checkpoint(tmp_path / "swin", tiny_swin())
    out = tmp_path / "clip"
    _run(checkpoint, out, "--learning_rate", "0")
    encoder = _encoder_weights(checkpoint)
    pretrained, random = (_tower(out / f"{tower}-tower", "vision_model.") for tower in ("simmim", "random"))
    assert set(pretrained) == set(encoder)
    for key, value in encoder.items():
        torch.testing.assert_close(pretrained[key], value, rtol=0, atol=0, msg=key)
    patch_embedding = "encoder.patch_embed.proj.weight"
    assert (random[patch_embedding] - encoder[patch_embedding]).norm() > 0.5 * encoder[patch_embedding].norm()
    # both runs start from the same text tower: only the vision tower differs
    texts = [_tower(out / f"{tower}-tower", "text_model.") for tower in ("simmim", "random")]
    assert texts[0].keys() == texts[1].keys()
    assert all(torch.equal(texts[0][key], texts[1][key]) for key in texts[0])
    # the projection reads the pooled width: ViT's hidden size, Swin's last stage (embed_dim x 2 per later stage)
    fields = tiny_vit() if backbone == "vit" else tiny_swin()
    width = fields["hidden_size"] if backbone == "vit" else fields["embed_dim"] * 2 ** (len(fields["depths"]) - 1)
    assert _tower(out / "simmim-tower", "visual_projection.")["weight"].shape == (8, width)


def test_refusals_before_any_work(vit_checkpoint, tmp_path):
    script = load_script("examples/run_clip.py")
    with pytest.raises(ValueError, match="exactly one"):
        script.main(["--vision_model_name_or_path", str(vit_checkpoint), "--caption_template", "a photo"])
    arguments = tmp_path / "args.json"  # the same flags as one JSON object
    arguments.write_text(json.dumps({"vision_model_name_or_path": str(vit_checkpoint), "caption_template": "{} {}"}))
    with pytest.raises(ValueError, match="exactly one"):
        script.main([str(arguments)])
    empty = tmp_path / "no-checkpoint"
    empty.mkdir()
    with pytest.raises(ValueError, match="run_mim.py --output_dir"):
        script.main(["--vision_model_name_or_path", str(empty), "--output_dir", str(tmp_path / "out")])


def test_captions_of_the_same_class_are_positives_in_the_loss():
    """Labels [0, 0, 1]: image 0's targets are captions 0 and 1 (half each), image 2's caption 2 alone; the loss is
    the mean of both directions' cross-entropies, written out by hand."""
    from types import SimpleNamespace

    from hf_simmim.training.contrastive import CaptionContrastiveTrainer

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.5, -1.0], [0.0, 0.3, 1.2]])
    model = lambda **inputs: SimpleNamespace(logits_per_image=logits)  # noqa: E731
    loss = CaptionContrastiveTrainer.compute_loss(None, model, {"labels": torch.tensor([0, 0, 1])})
    targets = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])

    def cross_entropy(rows):
        log_softmax = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -(targets * log_softmax).sum(axis=1).mean()

    expected = (cross_entropy(logits.numpy()) + cross_entropy(logits.numpy().T)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_several_processes_pretrain_the_missing_image_tower_once(tmp_path):
    """Under a launcher, one process pretrains (as a process of its own, without the launcher's RANK / WORLD_SIZE)
    while the other waits; both then use its checkpoint."""
    fake_pretraining = (
        "import os, pathlib, sys, time; time.sleep(2); out = pathlib.Path(sys.argv[1]); out.mkdir(exist_ok=True); "
        "(out / 'config.json').write_text('{}'); "
        "open(out / 'runs.txt', 'a').write(os.environ.get('RANK', 'no RANK') + ' ' + os.environ.get('WORLD_SIZE', '-') + '\\n')"
    )
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys\n"
        "from transformers import TrainingArguments\n"
        "from hf_simmim.training.contrastive import ensure_checkpoint\n"
        "from hf_simmim.training.distributed import end_distributed_run\n"
        f"args = TrainingArguments(output_dir={str(tmp_path / 'out')!r}, use_cpu=True)\n"
        f"command = [sys.executable, '-c', {fake_pretraining!r}, {str(tmp_path / 'tower')!r}]\n"
        f"print('returned', ensure_checkpoint({str(tmp_path / 'tower')!r}, True, command, args))\n"
        "end_distributed_run()\n"
    )
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(worker)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count(f"returned {tmp_path / 'tower'}") == 2
    assert (tmp_path / "tower" / "runs.txt").read_text() == "no RANK -\n"
