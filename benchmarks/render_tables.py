"""The README's performance and quality tables, rendered from the GPU suite's results (benchmarks/results/*.json,
written by benchmarks/gpu_suite.py).

    python benchmarks/render_tables.py                       # print the Markdown
    python benchmarks/render_tables.py --write README.md     # replace what lies between the markers in README.md
    python benchmarks/render_tables.py --include_tiny        # also show tiny CPU runs (labelled as such)

`--write FILE` replaces the text between the lines `<!-- gpu-suite:start -->` and `<!-- gpu-suite:end -->` and
leaves the rest of FILE as it was. Results of the suite's tiny CPU form (`"tiny": true`) check the path, not the
speed of any GPU: they are left out unless --include_tiny, and then their device column says "tiny CPU run".
"""

import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
START_MARKER = "<!-- gpu-suite:start -->"
END_MARKER = "<!-- gpu-suite:end -->"


def load_results(results_dir=RESULTS_DIR, include_tiny=False):
    """Every suite result in `results_dir`, newest first; tiny CPU runs only when `include_tiny`."""
    results = []
    for path in sorted(Path(results_dir).glob("*.json")):
        result = json.loads(path.read_text())
        if result.get("suite") != "gpu_suite":
            raise ValueError(f"{path} is not a result of benchmarks/gpu_suite.py (no \"suite\": \"gpu_suite\"): "
                             "move it out of the results folder.")
        if include_tiny or not result.get("tiny"):
            results.append(result)
    return sorted(results, key=lambda result: result["date"], reverse=True)


def run_label(result):
    """Device, date and commit of one suite run; tiny CPU runs say so."""
    commit = (result.get("commit") or "unknown commit")[:9] + (" (modified)" if result.get("dirty") else "")
    device = f"{result['device']}, tiny CPU run" if result.get("tiny") else result["device"]
    return f"{device}; {result['date'][:10]}; {commit}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value, digits):
    """`value` with `digits` decimals; '-' for a missing or NaN figure."""
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def performance_rows(result):
    rows = []
    for key, part in result["parts"].items():
        if not key.startswith("throughput") or part.get("status") != "ok":
            continue
        mode = "compiled" if part.get("compiled") else "eager"
        for row in part["rows"]:
            rows.append([
                run_label(result), mode, row["model"], row["batch"], number(row["images_per_s"], 0),
                number(row["gflop_per_image"], 1), number(row["mfu"], 3), number(row.get("peak_mem_gib"), 1),
                number(row.get("ratio"), 2) + ("x" if row.get("ratio") is not None else ""),
            ])
    return rows


def end_to_end_rows(result):
    part = result["parts"].get("end_to_end", {})
    if part.get("status") not in ("ok", "partial"):  # partial: killed at its limit after some logged windows
        return []
    return [[
        run_label(result), part["preset"], part["batch"], part["workers"], part["crops_on"],
        number(part["images_per_s"], 0),
        number(part.get("synthetic_images_per_s"), 0), number(part.get("ratio"), 2),
    ]]


def quality_rows(result):
    part = result["parts"].get("quality", {})
    if part.get("status") != "ok":
        return []
    summary = part["summary"]
    return [[
        run_label(result), part["plan"]["pretrain_epochs"], part["plan"]["finetune_epochs"],
        number(summary["top1_pretrained"], 4), number(summary["top1_scratch"], 4),
        f"{summary['gain_points']:+.1f}", number(summary["masked_l1"], 4), number(summary["psnr_db"], 2),
        f"{summary['pretrain_s']:.0f} + {summary['finetune_pretrained_s']:.0f} + {summary['finetune_scratch_s']:.0f}",
    ]]


def render(results):
    """The Markdown of the three tables (performance, end to end, quality) from `results` (`load_results`)."""
    performance = [row for result in results for row in performance_rows(result)]
    end_to_end = [row for result in results for row in end_to_end_rows(result)]
    quality = [row for result in results for row in quality_rows(result)]
    sections = [
        "Training step on random data (`benchmarks/throughput.py`: forward, backward, AdamW; bf16 autocast on GPUs; "
        "ours / transformers: our speed over transformers' at the same architecture, >1 when ours is faster):",
        markdown_table(["run", "mode", "model", "batch", "images/s", "GFLOP/image", "MFU", "peak GiB",
                        "ours / transformers"], performance) if performance else "_no measurement yet_",
        "End to end (`examples/run_mim.py` on generated 224-px JPEGs, dataloader workers decoding, crops where "
        "`--augmentation_device auto` put them) against the synthetic step of the same model:",
        markdown_table(["run", "model", "batch", "workers", "crops on", "images/s end to end", "images/s synthetic",
                        "ratio"], end_to_end) if end_to_end else "_no measurement yet_",
        "Pretraining gain (`benchmarks/quality_cifar10.py`: ViT-Tiny/4 pretrained on the 10,000 unlabeled images of "
        "cifar10-small, fine-tuned on 100 labels per class, against the same fine-tuning from scratch; top-1 on "
        "its 2,000 test images):",
        markdown_table(["run", "pretrain epochs", "fine-tune epochs", "top-1 pretrained", "top-1 scratch",
                        "gain (points)", "masked L1", "PSNR dB", "time s (pretrain + 2 fine-tunings)"], quality)
        if quality else "_no measurement yet_",
        "_Rendered by `python benchmarks/render_tables.py --write README.md` from `benchmarks/results/*.json` "
        "(written by `benchmarks/gpu_suite.py`)._",
    ]
    return "\n\n".join(sections) + "\n"


def replace_between_markers(text, block):
    """`text` with what lies between its START_MARKER and END_MARKER lines replaced by `block`."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise ValueError(
            f"the file needs a line {START_MARKER} followed by a line {END_MARKER} where the tables go: add them."
        )
    head = text[: start + len(START_MARKER)]
    return f"{head}\n{block}{text[end:]}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", default=str(RESULTS_DIR))
    parser.add_argument("--write", default=None, metavar="FILE", help="rewrite FILE between the markers")
    parser.add_argument("--include_tiny", action="store_true", help="also show tiny CPU runs, labelled as such")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    block = render(load_results(args.results_dir, args.include_tiny))
    if args.write:
        path = Path(args.write)
        path.write_text(replace_between_markers(path.read_text(), block))
        print(f"{path}: tables rewritten between {START_MARKER} and {END_MARKER}")
    else:
        sys.stdout.write(block)
    return block


if __name__ == "__main__":
    main()
