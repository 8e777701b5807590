"""The ``flightcheck`` command line.

``flightcheck analyze LOGDIR`` prints the curve diagnosis of every TensorBoard run under
``LOGDIR`` (runs made without flightcheck included), as a table or as JSON, and exits
non-zero when it finds an error, so it can gate a CI job.

Exit codes:
    0: every run judged, no finding at the ``--fail-on`` level (default: error);
    1: at least one finding at that level;
    2: nothing could be judged (no such directory, no event files, no loss series in any run)
       or a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from flightcheck.findings import Severity

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_UNUSABLE = 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flightcheck", description="Catch deep-learning training bugs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    an = sub.add_parser(
        "analyze",
        help="diagnose the loss curves of TensorBoard runs",
        description="Diagnose the training and validation loss curves of every TensorBoard run under LOGDIR: "
        "divergence, oscillation, plateau, spikes, over- and underfitting, with the step each began. "
        "Exit codes: 0 nothing at the --fail-on level, 1 found something at that level, "
        "2 nothing could be judged.",
    )
    an.add_argument("logdir", metavar="LOGDIR", help="a TensorBoard log directory (its runs are found recursively)")
    an.add_argument("--train-tag", default=None, help="the training loss's tag (default: found by name, e.g. train_loss)")
    an.add_argument("--val-tag", default=None, help="the validation loss's tag (default: found by name, e.g. val_loss)")
    an.add_argument("--json", action="store_true", help="print JSON instead of tables")
    an.add_argument("--fail-on", choices=("error", "warning", "never"), default="error",
                    help="exit 1 when a finding is at least this severe (default: error)")
    an.add_argument("--warmup-steps", type=int, default=50, help="steps not judged at the start (default 50)")
    an.add_argument("--target-error", type=float, default=None,
                    help="human-level or irreducible error in the loss's units: adds underfitting against it "
                    "and the bias/variance decomposition")
    an.add_argument("--floor", type=float, default=None, help="the lowest reachable loss, when known (e.g. 0)")
    an.add_argument("--baseline", type=float, default=None, help="a trivial predictor's loss")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flightcheck`` command; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command != "analyze":
        parser.print_help(sys.stderr)
        return EXIT_UNUSABLE
    return _analyze(args)


def _analyze(args: argparse.Namespace) -> int:
    from flightcheck.analyze import analyze, worst_severity

    if args.warmup_steps < 0:
        print("flightcheck analyze: --warmup-steps must be >= 0", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        reports = analyze(
            args.logdir,
            train_tag=args.train_tag,
            val_tag=args.val_tag,
            warmup_steps=args.warmup_steps,
            target_error=args.target_error,
            floor=args.floor,
            baseline=args.baseline,
        )
    except FileNotFoundError as err:
        print(f"flightcheck analyze: {err}", file=sys.stderr)
        return EXIT_UNUSABLE
    judged = [r for r in reports if r.diagnosis is not None]
    worst = worst_severity(reports)
    if args.json:
        print(json.dumps({"logdir": args.logdir, "worst": None if worst is None else worst.value,
                          "runs": [r.to_dict() for r in reports]}, indent=2, allow_nan=False, default=str))
    else:
        if not reports:
            print(f"no TensorBoard event files under {args.logdir}")
        for r in reports:
            print(r.format())
            print()
    if not judged:
        if reports and not args.json:
            print("nothing could be judged: no run has a loss series", file=sys.stderr)
        return EXIT_UNUSABLE
    if args.fail_on == "never" or worst is None:
        return EXIT_OK
    threshold = Severity(args.fail_on)
    return EXIT_FOUND if worst.rank >= threshold.rank else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
