#!/usr/bin/env python
"""Quality benchmark: every algorithm x 3 seeds on the embedded demo task, against the NLL reference.

    python bench/demo_quality.py --output_dir runs/bench_quality

Prints mean +/- std (over seeds) of the test final_reward and of each component per algorithm,
the NLL reference's, and each algorithm's gain as a share of the headroom
(max reward - reference reward), and V(x)'s cross-validated R^2 for the A-LoL variants; ``a_lol+k4`` is a_lol
with V(x) fit to the mean reward of 4 sampled outputs per validation prompt (``--value_samples 4``)
instead of one, ``a_lol+ridge`` a_lol with the ridge value head (``--value_head ridge``).
Target: every A-LoL variant >= 25% of the headroom.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lolrl.demo import task as demo_task  # noqa: E402
from lolrl.demo.pipeline import DemoSettings, run_demo, summarise  # noqa: E402
from lolrl.engine.losses import ALGORITHMS  # noqa: E402

TARGET = 0.25


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/bench_quality")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algorithms",
                        default=",".join([*(a for a in ALGORITHMS if a != "nll"), "a_lol+k4", "a_lol+ridge"]))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = run_demo(args.output_dir, args.algorithms.split(","), [int(s) for s in args.seeds.split(",")],
                    DemoSettings())
    summary = summarise(rows)
    reference = summary.pop("nll (reference)")["final_reward"]
    headroom = demo_task.MAX_REWARD - reference
    components = list(demo_task.COMPONENTS)
    print()
    print(f"NLL reference: test final_reward {reference:.3f} (max {demo_task.MAX_REWARD:.1f}, headroom {headroom:.3f})")
    print("| algorithm | final_reward | " + " | ".join(components) + " | share of headroom | V(x) R^2 |")
    print("|---|---:|" + "---:|" * len(components) + "---:|---:|")
    missed = []
    for algorithm, entry in summary.items():
        share = (entry["final_reward"] - reference) / headroom if headroom > 0 else float("nan")
        cells = [f"{entry[c]:.3f} ± {entry[c + '_std']:.3f}" for c in ["final_reward", *components]]
        r2 = f"{entry['value_r2']:.3f} ± {entry['value_r2_std']:.3f}" if "value_r2" in entry else "-"
        print(f"| {algorithm} | " + " | ".join(cells) + f" | {100 * share:.0f}% | {r2} |")
        if algorithm.startswith("a_lol") and not share >= TARGET:
            missed.append(algorithm)
    print()
    print(f"target (every A-LoL variant >= {100 * TARGET:.0f}% of the headroom): "
          + ("met" if not missed else f"NOT met by {', '.join(missed)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
