"""Step time of training stages 1 and 2 with a warm feature cache against without one, measured in one run.

Stage 1 reads media (decode + frozen encoder per item without the cache); stage 2 reads caption embeddings (the
decoder's text encoder per caption without the cache). Both runs of a stage use the same data plan, model and
steps; the figure is the ratio of median step times (the first steps are left out: they load decoders), runs of
the two modes alternated.

    python benchmarks/bench_training.py [--steps 12] [--size 24]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from toyworld.sample_configs import write_sample
from training.config import load_config
from training.precompute import precompute
from training.trainer import StageTrainer


def median_step_time(out: Path, global_batch: int, skip: int) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(global_batch / r["samples_per_s"] for r in rows[skip:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=24, help="records per dataset of the sample data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, alternated")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_sample(Path(tmp) / "data", size=args.size)
        for stage in (1, 2):
            sets = [f"train.batch_size={args.batch_size}", "train.save_every=0"]
            times: dict[str, list[float]] = {"no_cache": [], "warm_cache": []}
            precompute(load_config(root / f"stage{stage}.yaml", overrides=[*sets, f"cache_dir={Path(tmp) / 'cache'}"]))
            for rep in range(args.repeats):  # alternate the two so drift in machine load hits both alike
                for mode in ("no_cache", "warm_cache"):
                    cache = "null" if mode == "no_cache" else str(Path(tmp) / "cache")
                    config = load_config(root / f"stage{stage}.yaml", overrides=[*sets, f"cache_dir={cache}"])
                    out = Path(tmp) / f"stage{stage}-{mode}-{rep}"
                    StageTrainer(config, output_dir=out, max_steps=args.steps).train()
                    times[mode].append(median_step_time(out, args.batch_size, skip=2))
            times = {k: statistics.median(v) for k, v in times.items()}
            results[f"stage{stage}"] = {
                "step_s_no_cache": round(times["no_cache"], 4),
                "step_s_warm_cache": round(times["warm_cache"], 4),
                "ratio_no_cache_over_cache": round(times["no_cache"] / times["warm_cache"], 2),
            }
    print(json.dumps(results, indent=2))
    print("\n| stage | step without cache (s) | step with warm cache (s) | ratio |")
    print("|---|---|---|---|")
    for stage, r in results.items():
        print(f"| {stage} | {r['step_s_no_cache']} | {r['step_s_warm_cache']} | {r['ratio_no_cache_over_cache']} |")


if __name__ == "__main__":
    main()
