"""The scripts' command lines: flags users know from transformers' examples, no abbreviations, an honest --help,
and a resumed run that keeps its length."""

import json

import datasets
import pytest
import torch
from transformers.image_processing_base import ImageProcessingMixin

from conftest import load_script
from hf_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling
from hf_simmim.models.image_processing_simmim import SimMIMImageProcessor
from hf_simmim.training.arguments import parse_finetune_arguments, parse_run_arguments
from hf_simmim.training.finetuning import load_classification_model
from hf_simmim.training.runs import load_pretraining_model, load_run_datasets, prepare_output_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A vit-tiny-test pretraining checkpoint (32 px, patch 4, masks of 8 px, ratio 0.6) with its processor."""
    path = tmp_path_factory.mktemp("ckpt")
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit-tiny-test"))
    model.save_pretrained(path)
    SimMIMImageProcessor.from_model_config(model.config, image_mean=[0.5, 0.5, 0.5]).save_pretrained(path)
    return str(path)


def load_model(argv):
    return load_pretraining_model(parse_run_arguments(argv)[0])


# ---------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("argv", [["--max_step", "5"], ["--learning_rat", "3e-3"]])
def test_an_abbreviated_flag_is_refused_naming_it_and_the_full_name(argv):
    with pytest.raises(ValueError, match=f"Unknown flag {argv[0]}: did you mean {argv[0]}[es]"):
        parse_run_arguments(argv)


def test_given_flags_are_read_as_the_parser_reads_them():
    _, _, recipe_args, args, given = parse_run_arguments(
        ["--no_stop_on_nonfinite_loss", "--no_weight_decay_names", "mask_token", "--learning-rate=3e-3"]
    )
    assert recipe_args.stop_on_nonfinite_loss is False and args.learning_rate == 3e-3
    assert {"stop_on_nonfinite_loss", "no_weight_decay_names", "learning_rate"} <= given


def test_help_opens_with_the_description_and_states_one_default_per_flag(capsys):
    run_mim = load_script("examples/run_mim.py")
    with pytest.raises(SystemExit) as exit_info:
        run_mim.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = text.index("\noptions:")
    assert text.index("SimMIM pretraining in one command") < options  # what the script does, before any flag
    assert text.index("  --preset") < text.index("  --recipe") < text.index("  --output_dir")  # ours first
    assert "(default: None)" not in text
    preset = text[text.index("  --preset") : text.index("  --config_file")]
    assert "vit-tiny-test" in preset and "(default" not in preset
    negated = " ".join(text[text.index("  --no_stop_on_nonfinite_loss") : text.index("  --model_card_license")].split())
    assert "Turn --stop_on_nonfinite_loss off (it is on by default)." in negated
    assert "Stop at" not in negated and "(default: False)" not in negated


def test_finetune_help_opens_with_the_description(capsys):
    with pytest.raises(SystemExit):
        parse_finetune_arguments(["--help"], description="Fine-tune a SimMIM encoder.")
    text = capsys.readouterr().out
    assert text.index("Fine-tune a SimMIM encoder.") < text.index("\noptions:")
    assert "  --ignore_mismatched_sizes" in text and "  --max_train_samples" in text


def test_train_val_split_is_transformers_fraction_of_our_percentage():
    data_args = parse_run_arguments(["--train_val_split", "0.15"])[1]
    assert data_args.validation_split_percentage == pytest.approx(15.0)
    finetune_data_args = parse_finetune_arguments(["--model_name_or_path", "ckpt", "--train_val_split", "0.2"])[1]
    assert finetune_data_args.validation_split_percentage == pytest.approx(20.0)
    with pytest.raises(ValueError, match="not both"):
        parse_run_arguments(["--train_val_split", "0.15", "--validation_split_percentage", "15"])
    with pytest.raises(ValueError, match=r"--train_val_split=15.0 is a fraction"):
        parse_run_arguments(["--train_val_split", "15"])


# ---------------------------------------------------------------------------------------------- model flags
def test_model_type_picks_the_base_model_of_a_backbone_and_must_match_a_named_one(checkpoint):
    assert parse_run_arguments(["--model_type", "vit"])[0].preset == "vit-base-patch16-224"
    assert parse_run_arguments(["--model_type", "swin"])[0].preset == "swin-base-window6-192"
    assert parse_run_arguments(["--model_type", "simmim"])[0].preset is None  # the default tiny model
    with pytest.raises(ValueError, match="--model_type beit is not a SimMIM model type: use one of simmim, vit"):
        parse_run_arguments(["--model_type", "beit"])
    with pytest.raises(ValueError, match="--model_type swin but preset vit-tiny-test is a vit model"):
        load_model(["--model_type", "swin", "--preset", "vit-tiny-test"])
    with pytest.raises(ValueError, match=f"--model_type swin but {checkpoint} is a vit model"):
        load_model(["--model_type", "swin", "--model_name_or_path", checkpoint])
    model, _ = load_model(["--model_type", "vit", "--model_name_or_path", checkpoint])
    assert model.config.backbone == "vit"


def test_shape_and_mask_flags_override_a_preset(tmp_path):
    model, processor = load_model(
        ["--preset", "swin-tiny-test", "--image_size", "64", "--mask_patch_size", "16", "--mask_ratio", "0.5"]
    )
    assert (model.config.image_size, model.config.mask_patch_size, model.config.mask_ratio) == (64, 16, 0.5)
    assert (processor.image_size, processor.mask_patch_size, processor.mask_ratio) == (64, 16, 0.5)
    model.config.to_json_file(str(tmp_path / "config.json"))
    from_file, _ = load_model(["--config_file", str(tmp_path / "config.json"), "--patch_size", "8"])
    assert from_file.config.patch_size == 8 and from_file.config.image_size == 64
    with pytest.raises(ValueError, match="--mask_ratio 0.5 and --config_overrides mask_ratio=0.4 disagree"):
        load_model(["--mask_ratio", "0.5", "--config_overrides", "mask_ratio=0.4"])


def test_a_checkpoint_takes_new_masks_but_not_another_patch_size(checkpoint):
    new_masks = ["--mask_ratio", "0.4", "--mask_patch_size", "16"]
    model, processor = load_model(["--model_name_or_path", checkpoint, *new_masks])
    assert (model.config.mask_ratio, model.config.mask_patch_size) == (0.4, 16)
    assert (processor.mask_ratio, processor.mask_patch_size) == (0.4, 16)  # the masks the run draws
    assert list(processor.image_mean) == [0.5, 0.5, 0.5]  # the normalisation it was pretrained with
    with pytest.raises(ValueError, match=f"--patch_size 8 disagrees with the checkpoint {checkpoint}, whose patch "
                       "embedding is for patch_size 4: drop it"):
        load_model(["--model_name_or_path", checkpoint, "--patch_size", "8"])
    model, _ = load_model(["--model_name_or_path", checkpoint, "--patch_size", "4", "--image_size", "64"])
    table = model.simmim.encoder.rel_pos_bias.relative_position_bias_table
    assert model.config.image_size == 64 and table.shape == (31 * 31 + 3, 2)  # resized to the 16x16 grid


def test_image_processor_name_gives_the_normalisation_and_the_model_the_sizes(checkpoint, tmp_path):
    SimMIMImageProcessor(image_size=224, image_mean=[0.1, 0.2, 0.3], image_std=[0.9, 0.8, 0.7]).save_pretrained(
        tmp_path
    )
    _, processor = load_model(["--image_processor_name", str(tmp_path)])
    assert list(processor.image_mean) == [0.1, 0.2, 0.3] and list(processor.image_std) == [0.9, 0.8, 0.7]
    assert processor.image_size == 32  # vit-tiny-test's
    with pytest.raises(ValueError, match="--image_processor_name .*missing: no image processor could be read"):
        load_model(["--image_processor_name", str(tmp_path / "missing")])


def test_revision_and_token_reach_every_hub_download(checkpoint, monkeypatch):
    calls = []

    def recording(method):
        original = method.__func__

        def record(cls, *args, **kwargs):
            calls.append((cls.__name__, kwargs.get("revision"), kwargs.get("token")))
            return original(cls, *args, **kwargs)

        return classmethod(record)

    for cls in (SimMIMConfig, SimMIMForMaskedImageModeling):
        monkeypatch.setattr(cls, "from_pretrained", recording(cls.from_pretrained))
    # the image processor is read as a dict (its normalisation), whatever processor class saved it
    monkeypatch.setattr(
        ImageProcessingMixin, "get_image_processor_dict", recording(ImageProcessingMixin.get_image_processor_dict)
    )
    argv = ["--model_name_or_path", checkpoint, "--model_revision", "v2", "--token", "hf_secret"]
    load_model(argv)
    loaded = {name for name, *_ in calls}
    assert {"SimMIMConfig", "SimMIMForMaskedImageModeling", "ImageProcessingMixin"} <= loaded
    assert all((revision, token) == ("v2", "hf_secret") for _, revision, token in calls)


def test_token_reaches_a_hub_dataset(monkeypatch, tmp_path):
    seen = {}

    def load_dataset(path, name=None, **kwargs):
        seen.update(path=path, token=kwargs.get("token"))
        images = [torch.zeros(3, 8, 8, dtype=torch.uint8).permute(1, 2, 0).numpy()] * 4
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images})})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    model_args, data_args, _, training_args, _ = parse_run_arguments(
        ["--dataset_name", "someone/private-images", "--token", "hf_secret", "--output_dir", str(tmp_path)]
    )
    train, _ = load_run_datasets(data_args, training_args, model_args.cache_dir, model_args.token)
    assert seen == {"path": "someone/private-images", "token": "hf_secret"} and len(train) > 0


def test_trust_remote_code_is_accepted_and_says_it_changes_nothing(caplog):
    assert parse_run_arguments(["--trust_remote_code"])[0].trust_remote_code is True
    assert "--trust_remote_code changes nothing here" in caplog.text


# ---------------------------------------------------------------------------------------------- fine-tuning flags
def test_ignore_mismatched_sizes_loads_a_classifier_for_other_classes(tmp_path):
    config = SimMIMConfig.from_preset("vit-tiny-test", num_labels=3)
    SimMIMForImageClassification(config).save_pretrained(tmp_path)
    argv = ["--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(Exception, match="classifier.weight .*ignore_mismatched_sizes"):
        load_classification_model(parse_finetune_arguments(argv)[0], num_labels=5)
    model, _ = load_classification_model(parse_finetune_arguments(argv + ["--ignore_mismatched_sizes"])[0], 5)
    assert model.classifier.out_features == 5


def test_finetune_max_train_samples_cuts_the_training_images(tmp_path):
    argv = ["--model_name_or_path", "ckpt", "--max_train_samples", "20", "--output_dir", str(tmp_path)]
    _, data_args, _, training_args, _ = parse_finetune_arguments(argv)
    train, validation = load_run_datasets(data_args, training_args)
    assert len(train) == 20 and len(validation) == 200  # the bundled sample's test split is kept whole


# ---------------------------------------------------------------------------------------------- resuming
def resume(output_dir, *flags):
    model_args, _, recipe_args, args, given = parse_run_arguments(
        ["--output_dir", str(output_dir), "--resume_from_checkpoint", "last", *flags]
    )
    prepare_output_dir(args, recipe_args, model_args, given)
    return args


def test_a_resumed_run_keeps_the_length_its_schedule_was_planned_for(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    state = {"global_step": 4, "max_steps": 8, "num_train_epochs": 2, "log_history": []}
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(state))
    assert resume(tmp_path).max_steps == 8  # not the default 30 epochs
    assert resume(tmp_path, "--max_steps", "8").max_steps == 8
    assert resume(tmp_path, "--num_train_epochs", "2").max_steps == 8
    with pytest.raises(ValueError, match=r"--max_steps 12 asks for another length than the run being resumed "
                       r"\(.*checkpoint-4: 8 steps, 2 epochs\)"):
        resume(tmp_path, "--max_steps", "12")
    with pytest.raises(ValueError, match=r"--num_train_epochs 5 asks for another length.*--model_name_or_path"):
        resume(tmp_path, "--num_train_epochs", "5")


def test_each_fine_tuning_mode_has_its_own_default_output_folder():
    """A k-NN run must not silently replace a linear probe's results (or a fine-tuning run's)."""
    folders = {
        mode: parse_finetune_arguments(["--model_name_or_path", "ckpt", "--mode", mode])[3].output_dir
        for mode in ("finetune", "linear_probe", "knn")
    }
    assert len(set(folders.values())) == 3
    assert folders["knn"].endswith("simmim-knn") and folders["linear_probe"].endswith("simmim-linear-probe")
    given = parse_finetune_arguments(["--model_name_or_path", "ckpt", "--mode", "knn", "--output_dir", "mine"])[3]
    assert given.output_dir == "mine"


def test_num_channels_builds_a_model_of_that_many_channels_and_a_checkpoint_keeps_its_own(tmp_path):
    model, processor = load_model(["--num_channels", "1", "--image_mean", "0.25", "--image_std", "0.5"])
    assert model.config.num_channels == 1 and model.decoder[0].out_channels == model.config.encoder_stride**2
    assert processor.num_channels == 1 and list(processor.image_mean) == [0.25] and not processor.converts_to_rgb
    with pytest.raises(ValueError, match="num_channels=1 needs image_mean and image_std"):
        load_model(["--num_channels", "1"])  # no data to compute them from
    with pytest.raises(ValueError, match="Give --image_mean and --image_std together"):
        load_model(["--num_channels", "1", "--image_mean", "0.25"])
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--num_channels 3 disagrees with the checkpoint .* num_channels 1"):
        load_model(["--model_name_or_path", str(tmp_path), "--num_channels", "3"])


def test_mask_column_sets_the_user_strategy_and_refuses_another():
    model_args, data_args = parse_run_arguments(["--mask_column", "defects"])[:2]
    assert model_args.mask_strategy == "user" and data_args.mask_column == "defects"
    with pytest.raises(ValueError, match="--mask_column defects gives each image its own mask, but --mask_strategy grid"):
        parse_run_arguments(["--mask_column", "defects", "--mask_strategy", "grid"])
    with pytest.raises(ValueError, match="--mask_strategy user takes each image's mask from a column"):
        parse_run_arguments(["--mask_strategy", "user"])


def test_image_processor_name_takes_the_normalisation_of_any_saved_processor(tmp_path):
    """A transformers ViT processor (e.g. of an export) lends its mean, std and resampling; sizes follow the model;
    a folder without a processor is an error naming the flag."""
    from transformers import ViTImageProcessor

    from hf_simmim.training.runs import load_image_processor

    ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], resample=2).save_pretrained(tmp_path)
    config = SimMIMConfig.from_preset("vit-tiny-test")
    model_args = parse_run_arguments(["--image_processor_name", str(tmp_path)])[0]
    processor = load_image_processor(model_args, config, {})
    assert (list(processor.image_mean), list(processor.image_std), processor.resample) == ([0.5] * 3, [0.25] * 3, 2)
    assert processor.image_size == 32 and processor.mask_patch_size == 8


def test_config_overrides_cannot_set_what_fine_tuning_takes_from_the_labels():
    model_args = parse_finetune_arguments(
        ["--model_name_or_path", "ckpt", "--config_overrides", "problem_type=multi_label_classification"]
    )[0]
    with pytest.raises(ValueError, match="sets problem_type, which fine-tuning takes from the labels"):
        load_classification_model(model_args, 10)


@pytest.mark.parametrize("parse", [parse_run_arguments, parse_finetune_arguments])
def test_help_does_not_show_trainer_defaults_the_run_replaces(parse, capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 5e-05)" not in text and "the scaling rule" in text
    assert "(default: linear)" not in text and "(default: trainer_output)" not in text
