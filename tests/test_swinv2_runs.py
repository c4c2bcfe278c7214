"""The SwinV2 tiny preset end to end through the example scripts on the bundled sample: pretraining, then
fine-tuning its checkpoint at a larger window (the continuous position bias scaled by the pretrained windows)."""

import json

from conftest import load_script

from hf_simmim import SimMIMForImageClassification, SimMIMForMaskedImageModeling

FEW_STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none"]


def test_pretrain_then_fine_tune_at_a_larger_window(tmp_path):
    pretrained, tuned = tmp_path / "pretrained", tmp_path / "tuned"
    argv = ["--preset", "swinv2-tiny-test", "--max_train_samples", "16", "--max_eval_samples", "8", *FEW_STEPS]
    assert load_script("examples/run_mim.py").main([*argv, "--output_dir", str(pretrained)]) == 0
    source = SimMIMForMaskedImageModeling.from_pretrained(pretrained)
    assert source.config.backbone == "swinv2" and source.config.window_size == 4

    argv = ["--model_name_or_path", str(pretrained), "--config_overrides", "window_size=8", "--samples_per_class",
            "2", "--max_eval_samples", "10", "--eval_strategy", "no", "--save_strategy", "no", *FEW_STEPS]
    assert load_script("examples/run_finetune.py").main([*argv, "--output_dir", str(tuned)]) == 0
    saved = json.loads((tuned / "config.json").read_text())
    assert (saved["window_size"], saved["pretrained_window_sizes"]) == (8, [4, 4])
    model = SimMIMForImageClassification.from_pretrained(tuned)
    assert [block.window for block in model.simmim.encoder.layers[0].blocks] == [8, 8]
    # the encoder started from the pretrained weights (two small steps moved them only a little)
    start = source.simmim.encoder.layers[0].blocks[0].attn.cpb_mlp[0].weight
    end = model.simmim.encoder.layers[0].blocks[0].attn.cpb_mlp[0].weight
    assert (end - start).norm() < 0.1 * start.norm()
    assert 0.0 <= json.loads((tuned / "all_results.json").read_text())["eval_top1"] <= 1.0
