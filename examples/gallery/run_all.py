"""Run the whole gallery, or some of it, in one process and print what flightcheck caught.

    python examples/gallery/run_all.py                       # every broken model
    python examples/gallery/run_all.py --bug lr_too_high     # one (or several: --bug a --bug b)
    python examples/gallery/run_all.py --fast                # fewer epochs (FLIGHTCHECK_EXAMPLES_FAST=1)

Each script also runs on its own: ``python examples/gallery/lr_too_high.py``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import harness

#: the gallery, in the order of the README
BUGS = (
    "forgot_zero_grad",
    "softmax_before_cross_entropy",
    "labels_shuffled",
    "lr_too_high",
    "frozen_layer",
    "dead_relus",
    "nan_from_log",
    "unnormalised_inputs",
    "reads_the_target",
    "batch_mixed_by_view",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bug", action="append", choices=BUGS, help="run only this bug (repeatable)")
    parser.add_argument("--fast", action="store_true", default=harness.fast_default(), help="fewer epochs")
    parser.add_argument("--logdir", default="flightcheck_logs/gallery")
    args = parser.parse_args(argv)
    harness.quiet_lightning()

    rows = []
    for name in args.bug or BUGS:
        script = importlib.import_module(name)
        print(f"\n##### {name}: {script.__doc__.splitlines()[0]}")
        found, log_dir, seconds = harness.train(name, script.build, fast=args.fast, logdir=args.logdir)
        caught = harness.show(name, script.EXPECTED, found, log_dir)
        rows.append((name, script.EXPECTED, caught, seconds))

    print("\n| bug | check | caught | seconds |\n| --- | --- | --- | --- |")
    for name, expected, caught, seconds in rows:
        print(f"| {name} | `{expected}` | {'yes' if caught else 'NO'} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
