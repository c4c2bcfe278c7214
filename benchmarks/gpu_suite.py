"""The GPU suite: one command that measures, on a fresh GPU machine in at most 9 minutes, what the package promises
about speed and pretraining gain, most important first, writing its one JSON again the moment each figure exists
(a run cut short still leaves what it measured).

Parts (`--parts`, default a,b,c), in this order, each a subprocess whose time limit is what is left of --budget_s:
  a  the training-step table of benchmarks/throughput.py, eager (ours and transformers', ViT-B/16@224 and Swin-B
     w6@192, batch 128, bf16): images/s, GFLOP/image, MFU, peak memory, ratio;
  b  end to end: images/s of examples/run_mim.py (ViT-B/16@224, batch 128) on generated 224-px JPEGs (one Parquet
     file) with dataloader workers (the median of its logged `images_per_second` after the first window), and its
     ratio to a's synthetic images/s for the same model (target: at least 0.9);
  c  the quality protocol of benchmarks/quality_cifar10.py, pretraining with `--augmentation_device accelerator`
     (crops on the GPU), its epochs fitted to at most 5 minutes (--quality_budget_s) from per-epoch times measured
     before (--quality_*_epoch_s; the JSON records the plan and the times taken, to correct them): top-1 pretrained
     and from scratch, the gain, masked L1 and PSNR;
  then, with the time left, a's table again with torch.compile (ViT, then Swin: one subprocess each).
The result: benchmarks/results/gpu-suite-DATE-DEVICE.json (device, versions, date, commit, every figure and each
part's status; a failed or timed-out part records its error and output tail and the suite goes on), copied with the
parts' whole output (gpu_suite.log) to --out. `benchmarks/render_tables.py` renders the README tables from all
results. `--tiny` runs the same parts at CPU sizes (throughput --tiny for ViT, 24 small JPEGs and 6 steps, quality
--smoke; no compiled table) into outputs/gpu_suite_tiny/: what CI runs; not GPU figures, never commit them.

On the lent GPU machine (device tool; it has PyTorch, transformers, accelerate, timm but not datasets/evaluate):
prepare here, in the repository root (.devdata/ and .whl/ are git-ignored; the device's copy of the tree has no
.git, so the commit travels in a file, written again before each run):

    mkdir -p .devdata && cp -r ../shared/data/cifar10-small .devdata/
    (git rev-parse HEAD; git status --porcelain --untracked-files=no) > .devdata/commit.txt
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19

then one `run` with carry [".devdata", ".whl"] and timeout_s 600:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT

and copy the JSON that comes back into benchmarks/results/, then `python benchmarks/render_tables.py --write
README.md`. The suite checks its prerequisites first (datasets for parts b and c, evaluate and the CIFAR data for
part c, a CUDA device unless --tiny) and names what is missing before any measurement.
"""

import argparse
import datetime
import functools
import importlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import render_tables  # noqa: E402

PARTS = ("a", "b", "c")
COMMIT_FILE = ROOT / ".devdata" / "commit.txt"
# Sizes of part b: full (GPU) and tiny (CPU) forms.
END_TO_END = {
    False: {"preset": "vit-base-patch16-224", "batch": 128, "steps": 160, "logging_steps": 40, "unique": 512,
            "size": 224},
    True: {"preset": "vit-tiny-test", "batch": 4, "steps": 6, "logging_steps": 2, "unique": 24, "size": 48},
}
# The tiny form times the ViT pair only, at part b's tiny batch: it checks the path within CI's time.
TINY_THROUGHPUT = ["--tiny", "--models", "vit", "--batch_size", "4", "--warmup", "1", "--repeats", "2"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="a,b,c", help="comma-separated parts to run, of a, b, c")
    parser.add_argument("--tiny", action="store_true", help="CPU sizes (CI): checks the path, measures no GPU")
    parser.add_argument("--budget_s", type=float, default=540, help="wall time of the whole suite")
    parser.add_argument("--out", default=None, help="also copy the JSON and the parts' output (gpu_suite.log) here")
    parser.add_argument("--results_dir", default=None,
                        help="default: benchmarks/results (outputs/gpu_suite_tiny with --tiny)")
    parser.add_argument("--data_dir", default=None,
                        help="cifar10-small (default: .devdata/cifar10-small, else ../shared/data/cifar10-small)")
    parser.add_argument("--work_dir", default=None, help="scratch files (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=None, help="part b's dataloader workers (default: CPUs - 2)")
    parser.add_argument("--quality_budget_s", type=float, default=300, help="part c's share at most")
    parser.add_argument("--quality_pretrain_epoch_s", type=float, default=1.8,
                        help="seconds per pretraining epoch (issue 13: 171 s for 100 epochs on an H100)")
    parser.add_argument("--quality_finetune_epoch_s", type=float, default=0.3, help="seconds per fine-tuning epoch")
    parser.add_argument("--quality_overhead_s", type=float, default=45,
                        help="part c's time besides the epochs: start-up, data loading, evaluations")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        parser.error(f"--parts {','.join(args.parts)}: give some of {','.join(PARTS)}, e.g. --parts a,c")
    if args.results_dir is None:
        args.results_dir = str(ROOT / "outputs" / "gpu_suite_tiny") if args.tiny else str(BENCHMARKS / "results")
    if args.data_dir is None:
        local = ROOT / ".devdata" / "cifar10-small"
        args.data_dir = str(local if local.is_dir() else ROOT.parent / "shared" / "data" / "cifar10-small")
    if args.workers is None:
        args.workers = 1 if args.tiny else max(1, (os.cpu_count() or 2) - 2)
    return args


def missing_prerequisites(args):
    """What the selected parts need and this machine lacks, each with its fix (empty when all is there)."""
    missing = []
    needed = {"datasets": {"b", "c"}, "evaluate": {"c"}}  # part a runs on what a bare GPU machine has
    for module in (name for name, parts in needed.items() if parts & set(args.parts)):
        try:
            importlib.import_module(module)
        except Exception as error:  # an ImportError, or a version conflict raised while importing
            missing.append(f"python package `{module}` does not import ({error}): carry its wheels in .whl/ "
                           "(see `python benchmarks/gpu_suite.py --help`)")
    data = Path(args.data_dir)
    if "c" in args.parts and not (list(data.glob("train-*.parquet")) and list(data.glob("test-*.parquet"))):
        missing.append(f"CIFAR data: {data} has no train-*.parquet and test-*.parquet: run `mkdir -p .devdata && "
                       "cp -r ../shared/data/cifar10-small .devdata/` and carry .devdata, or pass --data_dir")
    if not args.tiny and not torch.cuda.is_available():
        missing.append("a CUDA device: the full suite measures a GPU (torch.cuda.is_available() is False); "
                       "on a CPU run --tiny")
    return missing


def commit_info():
    """(commit, whether tracked files differ from it): from git, else from .devdata/commit.txt (the device
    machine's copy of the tree has no .git; the preparation writes that file)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True)
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        if COMMIT_FILE.is_file():
            lines = COMMIT_FILE.read_text().splitlines()
            return lines[0].strip(), any(line.strip() for line in lines[1:])
        return None, None


def versions():
    """Versions of what the figures depend on, as the running interpreter imports them."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "accelerate", "datasets", "evaluate", "numpy", "pyarrow", "PIL"):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = None
    return found


def device_name(tiny):
    if torch.cuda.is_available() and not tiny:
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} CPUs)"


class Suite:
    """The run's result, rewritten to disk after every part, and the subprocess runner that keeps to the budget."""

    def __init__(self, args, work_dir):
        self.args, self.work_dir = args, Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s
        self.out = Path(args.out) if args.out else None
        self.log_path = (self.out or self.work_dir) / "gpu_suite.log"
        commit, dirty = commit_info()
        now = datetime.datetime.now(datetime.timezone.utc)
        device = device_name(args.tiny)
        slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + ("-tiny" if args.tiny else "")
        self.path = Path(args.results_dir) / f"gpu-suite-{now:%Y%m%dT%H%M%SZ}-{slug}.json"
        self.result = {
            "suite": "gpu_suite", "tiny": args.tiny, "device": device, "date": now.isoformat(timespec="seconds"),
            "commit": commit, "dirty": dirty, "versions": versions(), "cpus": os.cpu_count(),
            "budget_s": args.budget_s, "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), "parts": {},
        }

    def remaining(self):
        return self.deadline - time.monotonic()

    def save(self):
        """Write the JSON (whole, then renamed into place) to the results folder and to --out."""
        text = json.dumps(self.result, indent=2)
        for folder in filter(None, (self.path.parent, self.out)):
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{self.path.name}.partial"
            partial.write_text(text)
            partial.replace(folder / self.path.name)

    def run(self, label, command, timeout_s):
        """Run `command` from the repository root in its own process group, its output appended to the log;
        killed (with its dataloader workers) after `timeout_s`, or sooner when the suite's budget runs out (a part
        may have spent some of its time before, e.g. writing its data). Returns (exit code or None on timeout,
        output)."""
        timeout_s = max(0.0, min(timeout_s, self.remaining()))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n===== {label} (limit {timeout_s:.0f} s): {shlex.join(command)}\n")
            log.flush()
            start = log.tell()
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                returncode = None
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            log.seek(start)
            return returncode, log.read()


def checked(returncode, output, timeout_s):
    """Raise PartError when a part's subprocess failed or ran out of time."""
    if returncode is None:
        raise PartError("timeout", f"killed after its limit of {timeout_s:.0f} s", output)
    if returncode != 0:
        raise PartError("failed", f"exit code {returncode}", output)


class PartError(Exception):
    def __init__(self, status, error, output=""):
        super().__init__(error)
        self.status, self.error, self.output = status, error, output


def throughput_part(suite, timeout_s, backbone=None):
    """Part a: benchmarks/throughput.py's rows (eager for both models, or compiled for `backbone`)."""
    table_path = suite.work_dir / f"throughput-{backbone or 'eager'}.json"
    command = [sys.executable, str(BENCHMARKS / "throughput.py"), "--json", str(table_path)]
    command += TINY_THROUGHPUT if suite.args.tiny else []
    command += ["--compile", "--models", backbone] if backbone else []
    checked(*suite.run(f"throughput {backbone or 'eager'}", command, timeout_s), timeout_s)
    table = json.loads(table_path.read_text())
    return {"compiled": bool(backbone), "table_device": table["device"], "rows": table["rows"]}


def write_jpeg_parquet(path, count, unique, size, processes):
    """A Parquet file of `count` JPEGs of `size` px (an image column, as datasets writes it): `unique` distinct
    ones from data_pipeline.write_jpegs (written by `processes` processes), repeated. A repeated JPEG decodes as
    slowly as a new one, and one epoch of `count` images keeps the measured steps clear of epoch boundaries. (Not an
    image folder: datasets lists a folder once per split-name pattern, which takes minutes for 20,000 files.)"""
    import data_pipeline
    import datasets

    shares = [unique // processes + (k < unique % processes) for k in range(processes)]
    jobs = [(path.parent / f"{path.stem}-{k}", share, size, size, k) for k, share in enumerate(shares)]
    with ProcessPoolExecutor(processes, mp_context=get_context("fork")) as pool:
        files = [file for chunk in pool.map(data_pipeline.write_jpegs, *zip(*jobs)) for file in chunk]
    encoded = [Path(file).read_bytes() for file in files]
    rows = [{"bytes": encoded[index % len(encoded)], "path": None} for index in range(count)]
    table = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    table.to_parquet(str(path))
    return path


def logged_rates(output):
    """The `images_per_second` values run_mim's ThroughputCallback logged, in order (read from its printed logs,
    so a run killed at its limit still gives the windows it finished)."""
    return [float(value) for value in re.findall(r"'images_per_second': '?([0-9.]+)", output)]


def synthetic_rate(suite, preset):
    """Part a's eager images/s of our model at `preset`, or None when part a has not measured it."""
    part = suite.result["parts"].get("throughput_eager", {})
    for row in part.get("rows", []):
        if row["model"].startswith("hf_simmim") and preset in row["model"]:
            return row["images_per_s"]
    return None


def end_to_end_part(suite, timeout_s):
    """Part b: run_mim.py's logged images/s on generated JPEGs, against part a's synthetic figure."""
    sizes = END_TO_END[suite.args.tiny]
    processes = 1 if suite.args.tiny else max(1, os.cpu_count() or 1)
    images = write_jpeg_parquet(suite.work_dir / "jpegs.parquet", sizes["steps"] * sizes["batch"], sizes["unique"],
                                sizes["size"], processes)
    command = [
        sys.executable, str(ROOT / "examples" / "run_mim.py"), "--preset", sizes["preset"], "--train_dir", str(images),
        "--validation_split_percentage", "0", "--eval_strategy", "no", "--output_dir", str(suite.work_dir / "run_mim"),
        "--overwrite_output_dir", "--max_steps", str(sizes["steps"]), "--logging_steps", str(sizes["logging_steps"]),
        "--logging_first_step", "false", "--per_device_train_batch_size", str(sizes["batch"]),
        "--dataloader_num_workers", str(suite.args.workers), "--dataloader_persistent_workers", "true",
        "--save_strategy", "no", "--report_to", "none", "--num_reconstruction_images", "0", "--disable_tqdm", "true",
        "--seed", "0",
    ]
    returncode, output = suite.run("end to end (run_mim.py)", command, timeout_s)
    windows = logged_rates(output)[1:]  # the first window holds start-up: workers, first batches, autotuning
    if not windows:
        checked(returncode, output, timeout_s)
        raise PartError("failed", "run_mim.py logged no images_per_second after its first window", output)
    images_per_s = statistics.median(windows)
    synthetic = synthetic_rate(suite, sizes["preset"])
    # run_mim logs where --augmentation_device auto put the crops, unless the model trains on the CPU (then: CPU)
    crops_on_device = "Training crops and flips run on the device" in output
    return {
        "status": "ok" if returncode == 0 else "partial", "preset": sizes["preset"], "batch": sizes["batch"],
        "workers": suite.args.workers, "steps": sizes["steps"], "logging_steps": sizes["logging_steps"],
        "crops_on": "device" if crops_on_device else "CPU",
        "jpegs": f"{sizes['steps'] * sizes['batch']} JPEGs in Parquet, {sizes['unique']} distinct, "
                 f"{sizes['size']}x{sizes['size']} px (data_pipeline.write_jpegs)",
        "images_per_s": images_per_s, "windows_images_per_s": windows, "synthetic_images_per_s": synthetic,
        "ratio": images_per_s / synthetic if synthetic else None,
    }


def quality_plan(args, budget_s):
    """Epochs of the quality protocol (100 pretraining, 100 fine-tuning, scaled down together) that fit
    `budget_s` by the per-epoch times given."""
    full = {"pretrain_epochs": 100, "finetune_epochs": 100}
    needed = full["pretrain_epochs"] * args.quality_pretrain_epoch_s + 2 * full["finetune_epochs"] * \
        args.quality_finetune_epoch_s
    scale = min(1.0, max(0.0, budget_s - args.quality_overhead_s) / needed)
    plan = {name: max(1, int(epochs * scale)) for name, epochs in full.items()}
    plan.update(budget_s=round(budget_s), expected_s=round(args.quality_overhead_s + scale * needed))
    return plan


def quality_part(suite, timeout_s):
    """Part c: benchmarks/quality_cifar10.py, its epochs fitted to the budget (`--smoke` when tiny), pretraining
    with GPU-side augmentation (the crops of CIFAR's 32-px images on the device)."""
    out = suite.work_dir / "quality"
    command = [sys.executable, str(BENCHMARKS / "quality_cifar10.py"), "--data_dir", suite.args.data_dir,
               "--output_dir", str(out), "--pretrain_args", "--augmentation_device accelerator"]
    if suite.args.tiny:
        plan = {"pretrain_epochs": 1, "finetune_epochs": 1, "smoke": True}
        command.append("--smoke")
    else:
        plan = quality_plan(suite.args, min(suite.args.quality_budget_s, suite.remaining()))
        command += ["--pretrain_epochs", str(plan["pretrain_epochs"]),
                    "--finetune_epochs", str(plan["finetune_epochs"])]
    checked(*suite.run("quality (quality_cifar10.py)", command, timeout_s), timeout_s)
    return {"plan": plan, "command": shlex.join(command[1:]), "summary": json.loads((out / "summary.json").read_text())}


def schedule(args):
    """(key, part letter, function, limit in seconds or None for all that is left), most important first."""
    steps = [("throughput_eager", "a", throughput_part, 240), ("end_to_end", "b", end_to_end_part, 240),
             ("quality", "c", quality_part, None)]
    if not args.tiny:  # compiling takes minutes: with the time left, after the rest
        steps += [(f"throughput_compiled_{backbone}", "a", functools.partial(throughput_part, backbone=backbone), None)
                  for backbone in ("vit", "swin")]
    return [step for step in steps if step[1] in args.parts]


def run_step(suite, key, part, limit_s):
    """Run one part within its limit and what is left of the budget; record its figures or its error, and save."""
    if suite.remaining() < 5:
        suite.result["parts"][key] = {"status": "skipped", "error": "no time left in --budget_s"}
        return suite.save()
    timeout_s = min(limit_s or float("inf"), suite.remaining())
    start = time.monotonic()
    try:
        record = {"status": "ok", **part(suite, timeout_s)}
    except PartError as error:
        record = {"status": error.status, "error": error.error, "tail": error.output[-4000:]}
    except Exception as error:  # a part's figures could not be read: record why, and go on with the next part
        record = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    record.update(seconds=round(time.monotonic() - start, 1), limit_s=round(timeout_s))
    suite.result["parts"][key] = record
    print(f"[gpu_suite] {key}: {record['status']} in {record['seconds']} s"
          + (f" ({record['error']})" if "error" in record else ""), flush=True)
    suite.save()


def main(argv=None):
    args = parse_args(argv)
    missing = missing_prerequisites(args)
    if missing:
        raise SystemExit("gpu_suite cannot start; missing:\n  - " + "\n  - ".join(missing))
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as scratch:
        suite = Suite(args, args.work_dir or scratch)
        suite.save()
        print(f"[gpu_suite] {suite.result['device']}, budget {args.budget_s:.0f} s, writing {suite.path}", flush=True)
        for key, _, part, limit_s in schedule(args):
            run_step(suite, key, part, limit_s)
    print(render_tables.render([suite.result]))
    print(f"[gpu_suite] results: {suite.path}" + (f" (and {suite.out})" if suite.out else ""))
    return suite.result


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(part["status"] == "ok" for part in result["parts"].values()) else 1)
