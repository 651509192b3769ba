"""Does compact float16 storage change a model's validation Dice? Side by side in one run.

    python benchmarks/bench_compact.py FULL_MODEL COMPACT_MODEL DATASET --split split.json
        [--cache-dir DIR]

Both models segment every ``val`` case of the split in the preprocessed grid (the validation
of ``masksam train``; encoder output from the cache of a ``cpu``-recipe run, computed if
absent) and the per-structure Dice of each is printed with their difference, as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from MaskSAMLib.data.dataset_json import load_dataset
from MaskSAMLib.evaluation import dice_score
from MaskSAMLib.inference.sliding_window import sliding_window_labels
from MaskSAMLib.modeling.build import load_model_dir
from MaskSAMLib.training.cases import default_cache_dir, prepare_cases, split_cases
from MaskSAMLib.training.encoder_cache import encode_cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full")
    parser.add_argument("compact")
    parser.add_argument("dataset")
    parser.add_argument("--split", required=True)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N val cases")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    models = {"full": load_model_dir(args.full), "compact": load_model_dir(args.compact)}
    config = models["full"].config
    names = [lab.name for lab in config.labels]
    spec = load_dataset(args.dataset)
    cases = prepare_cases(spec, config.require_preprocessing(), names,
                          cache_dir=cache)
    _, val = split_cases(cases, val_fraction=0, seed=0, split_file=Path(args.split))
    val = val[: args.limit]
    encoded = encode_cases(models["full"], val, cache)
    dice: dict[str, dict[str, list[float]]] = {k: {n: [] for n in names[1:]} for k in models}
    for case in val:
        for key, model in models.items():
            store: dict = {}
            encoded[case.case_id].fill_window_cache(store)
            pred = sliding_window_labels(torch.from_numpy(case.image), model, encoder_cache=store)
            for k, name in enumerate(names[1:], start=1):
                dice[key][name].append(dice_score(pred == k, case.label == k))
    out = {key: {n: float(np.mean(v)) for n, v in per.items()} for key, per in dice.items()}
    for key in out:
        out[key]["mean"] = float(np.mean([out[key][n] for n in names[1:]]))
    out["difference"] = {n: out["compact"][n] - out["full"][n] for n in out["full"]}
    out["cases"] = len(val)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
