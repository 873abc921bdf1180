"""One table from the zero-shot runs: calibration source (real, synthetic, noise) by budget and allocator.

Reads the JSON files that ``benchmarks/allocators.py --calib data|synthetic|noise``
writes into one directory and prints a Markdown table per model, with the image
count and the generation time of the synthetic images.

    python benchmarks/zeroshot_table.py benchmarks/results/zeroshot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SOURCES = (("data", "real images"), ("synthetic", "synthetic"), ("noise", "Gaussian noise"))


def load_runs(directory: Path, model: str) -> dict[str, dict]:
    stem = model.replace("-", "_")
    runs = {}
    for source, _ in SOURCES:
        path = directory / (f"{stem}_allocators.json" if source == "data" else f"{stem}_{source}_allocators.json")
        if path.is_file():
            runs[source] = json.loads(path.read_text())
    return runs


def render(model: str, runs: dict[str, dict]) -> str:
    first = next(iter(runs.values()))
    budgets = list(dict.fromkeys(row["budget"] for row in first["rows"]))
    strategies = first["strategies"]
    header = " | ".join(f"{budget} {name}" for budget in budgets for name in strategies)
    lines = [f"{model}: top-1 (%) on {first['test_images'] or 'all'} test images, FP32 "
             f"{100 * first['fp32']['score']:.2f}%.", "",
             f"| calibration | images | generation (s) | {header} |",
             "|---|---:|---:|" + "---:|" * (len(budgets) * len(strategies))]
    for source, label in SOURCES:
        if source not in runs:
            continue
        record = runs[source]
        scores = {(row["budget"], row["strategy"]): row["score"] for row in record["rows"]}
        cells = []
        for budget in budgets:
            best = max(scores.get((budget, name), float("-inf")) for name in strategies)
            for name in strategies:
                value = scores.get((budget, name))
                text = "—" if value is None else f"{100 * value:.2f}"
                cells.append(f"**{text}**" if value is not None and value == best and len(strategies) > 1 else text)
        facts = record.get("calibration", {})
        seconds = facts.get("seconds")
        generation = f"{seconds:.0f}" if source == "synthetic" and seconds is not None else "—"
        if facts.get("from_cache"):
            generation = "cached"
        lines.append(f"| {label} | {record['calibration_images']} | {generation} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--models", nargs="+", default=["reference", "vits-cifar10"])
    args = parser.parse_args()
    for model in args.models:
        runs = load_runs(args.directory, model)
        if runs:
            print(render(model, runs))


if __name__ == "__main__":
    main()
