#!/usr/bin/env python
"""Detection benchmark: run every seeded-bug and healthy program under flightcheck and score it.

    python benchmarks/detection/run.py [--seeds 3] [--only NAME[,NAME|GLOB]] [--jobs N] [--json out.json]
    python benchmarks/detection/run.py --no-flightcheck     # sanity: do bugs show, do healthy runs learn?
    python benchmarks/detection/run.py --list

Each (program, seed) runs in its own forked process with a timeout, so a program that
crashes or hangs cannot take the harness down. Under flightcheck the callbacks are
``flightcheck.default_callbacks(preflight={"on_fail": "warn"}, activation_monitor=True)``;
a callback whose module does not exist yet (or cannot be built) is left out and named in the
header. A bug counts as caught when a finding of severity warning or error names one of the
program's ``expected_checks``; a healthy program is a false alarm on any warning or error
(``internal_error`` included, and also listed apart). The first fitting warning is timed as
``finding.step / planned optimizer steps`` (0 for the pre-flight). CPU only.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402

import flightcheck  # noqa: E402
from programs import Program, all_programs  # noqa: E402

ALARM = ("warning", "error")

#: Trainer arguments every program gets; a program's own ``trainer_kwargs`` win. Logging is
#: left at Lightning's defaults (``log_every_n_steps=50``): the monitors look at the run on a
#: cadence of their own (about 1/32 of the planned run, at least every 10 steps), so the
#: figures hold for users who never touch the logging interval.
BASE_TRAINER_KWARGS: dict[str, Any] = dict(
    accelerator="cpu",
    devices=1,
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
)

# The recommended set, as flightcheck.defaults lists it; the fallback is the same list, for a
# flightcheck whose defaults module changed shape.
_FALLBACK_SET = (
    ("preflight", "Preflight", "flightcheck.callbacks.preflight", True),
    ("nonfinite_guard", "NonFiniteGuard", "flightcheck.callbacks.nonfinite_guard", True),
    ("gradient_monitor", "GradientMonitor", "flightcheck.callbacks.gradient_monitor", True),
    ("loss_curve", "LossCurveMonitor", "flightcheck.callbacks.loss_curve", True),
    ("prediction_stability", "PredictionStability", "flightcheck.callbacks.prediction_stability", True),
    ("activation_monitor", "ActivationMonitor", "flightcheck.callbacks.activation_monitor", False),
)


# ----------------------------------------------------------------------------- callbacks
def make_callbacks(activation_monitor: bool = True) -> tuple[list[Any], dict[str, str]]:
    """The flightcheck callbacks that exist today, and a status line per callback.

    Each callback is built on its own through ``default_callbacks`` (all others switched off),
    so one that is missing or rejects its arguments leaves the others in place.
    """
    from flightcheck import defaults

    default_set = getattr(defaults, "_DEFAULT_SET", _FALLBACK_SET)
    keys = [key for key, *_ in default_set]
    overrides: dict[str, Any] = {"preflight": {"on_fail": "warn"}, "activation_monitor": activation_monitor}
    built: list[Any] = []
    status: dict[str, str] = {}
    for key, _cls, _module, on_by_default in default_set:
        choice = overrides.get(key, on_by_default)
        if choice is False:
            status[key] = "off"
            continue
        alone = {k: False for k in keys}
        try:
            built.extend(flightcheck.default_callbacks(**{**alone, key: choice}))
            status[key] = "on"
        except (ImportError, AttributeError) as err:
            status[key] = f"missing ({type(err).__name__})"
        except (TypeError, ValueError) as err:  # arguments not accepted (yet): use its defaults
            try:
                built.extend(flightcheck.default_callbacks(**{**alone, key: True}))
                status[key] = f"on, with its defaults ({type(err).__name__}: {err})"
            except Exception as err2:  # noqa: BLE001
                status[key] = f"unavailable ({type(err2).__name__}: {err2})"
        except Exception as err:  # noqa: BLE001
            status[key] = f"unavailable ({type(err).__name__}: {err})"
    return built, status


class Recorder(pl.Callback):
    """What the benchmark itself observes: the planned length, train losses, validation metrics."""

    def __init__(self) -> None:
        self.planned_steps: int | None = None
        self.train_losses: list[float] = []
        self.val: list[dict[str, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        try:
            self.planned_steps = int(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001
            self.planned_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            # under automatic optimisation Lightning hands back the loss divided by the accumulation
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self.train_losses.append(float(loss.detach().float()) * scale)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        row["step"] = trainer.global_step
        self.val.append(row)


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "flightcheck"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run_one(prog: Program, seed: int, flightcheck_on: bool, activation_monitor: bool, logger_kind: str) -> dict[str, Any]:
    """Train one program under one seed; return what happened (JSON-serialisable)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    torch.set_num_threads(1)
    _quiet()
    pl.seed_everything(seed, verbose=False)
    started = time.perf_counter()
    module, data, program_kwargs = prog.build(seed)
    recorder = Recorder()
    callbacks, cb_status = make_callbacks(activation_monitor) if flightcheck_on else ([], {})
    tmp = tempfile.mkdtemp(prefix=f"fcbench-{prog.name}-{seed}-")
    logger: Any = False
    if logger_kind == "tensorboard":
        logger = TensorBoardLogger(tmp, name="tb")
    elif logger_kind == "csv":
        logger = CSVLogger(tmp, name="csv")
    kwargs = {**BASE_TRAINER_KWARGS, "default_root_dir": tmp, "logger": logger, **program_kwargs}
    kwargs["callbacks"] = [recorder, *callbacks, *program_kwargs.get("callbacks", [])]
    status, error = "ok", None
    trainer = None
    try:
        trainer = pl.Trainer(**kwargs)
        if isinstance(data, pl.LightningDataModule):
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module, train_dataloaders=data[0], val_dataloaders=data[1])
    except flightcheck.PreflightError as err:
        status, error = "preflight_error", str(err)[:2000]
    except flightcheck.FlightcheckError as err:  # e.g. NonFiniteError under action="raise"
        status, error = "flightcheck_error", f"{type(err).__name__}: {err}"[:2000]
    except Exception as err:  # noqa: BLE001 - the program itself crashed
        status = "crashed"
        error = f"{type(err).__name__}: {err}\n" + "".join(traceback.format_exc(limit=-4))[-3000:]
    wall = time.perf_counter() - started
    found = [f.to_dict() for f in flightcheck.findings(trainer)] if trainer is not None else []
    shutil.rmtree(tmp, ignore_errors=True)
    losses = recorder.train_losses
    tail = losses[-max(1, len(losses) // 10):]
    last_val = recorder.val[-1] if recorder.val else {}
    return {
        "program": prog.name,
        "kind": prog.kind,
        "seed": seed,
        "status": status,
        "error": error,
        "wall_s": round(wall, 2),
        "planned_steps": recorder.planned_steps,
        "steps_done": int(trainer.global_step) if trainer is not None else 0,
        "callbacks": cb_status,
        "findings": found,
        "metrics": {
            "first_loss": _mean(losses[:5]),
            "final_loss": _mean(tail),
            "nonfinite_loss_steps": sum(1 for v in losses if not math.isfinite(v)),
            "val": last_val,
            "val_history": recorder.val,
        },
    }


# ----------------------------------------------------------------------------- process pool
def _child(prog: Program, seed: int, opts: dict[str, Any], out_path: str, log_path: str) -> None:
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        result = run_one(prog, seed, **opts)
    except BaseException as err:  # noqa: BLE001 - building the program failed
        result = {"program": prog.name, "kind": prog.kind, "seed": seed, "status": "crashed",
                  "error": f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-4)}"[-3000:],
                  "findings": [], "metrics": {}, "wall_s": None, "planned_steps": None, "steps_done": 0}
    with open(out_path, "w") as fh:
        json.dump(result, fh, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_all(tasks: list[tuple[Program, int]], opts: dict[str, Any], jobs: int, timeout: float, progress) -> list[dict[str, Any]]:
    ctx = mp.get_context("fork")
    scratch = Path(tempfile.mkdtemp(prefix="fcbench-results-"))
    pending = collections.deque(enumerate(tasks))
    running: dict[Any, tuple[int, Program, int, float, Path, Path]] = {}
    results: list[dict[str, Any] | None] = [None] * len(tasks)

    def finish(proc, timed_out: bool) -> None:
        i, prog, seed, t0, out_path, log_path = running.pop(proc)
        proc.join()
        log_tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        if not timed_out and out_path.exists():
            result = json.loads(out_path.read_text())
        else:
            why = f"timed out after {timeout:.0f}s" if timed_out else f"worker died (exit code {proc.exitcode})"
            result = {"program": prog.name, "kind": prog.kind, "seed": seed,
                      "status": "timeout" if timed_out else "crashed", "error": f"{why}\n{log_tail}",
                      "findings": [], "metrics": {}, "wall_s": round(time.perf_counter() - t0, 2),
                      "planned_steps": None, "steps_done": 0}
        results[i] = result
        progress(result)

    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, (prog, seed) = pending.popleft()
                out_path, log_path = scratch / f"{i}.json", scratch / f"{i}.log"
                proc = ctx.Process(target=_child, args=(prog, seed, opts, str(out_path), str(log_path)), daemon=True)
                proc.start()
                running[proc] = (i, prog, seed, time.perf_counter(), out_path, log_path)
            wait([p.sentinel for p in running], timeout=0.5)
            for proc in list(running):
                if not proc.is_alive():
                    finish(proc, timed_out=False)
                elif time.perf_counter() - running[proc][3] > timeout:
                    proc.kill()
                    finish(proc, timed_out=True)
    finally:
        for proc in list(running):
            proc.kill()
            proc.join()
        shutil.rmtree(scratch, ignore_errors=True)
    return [r for r in results if r is not None]


# ----------------------------------------------------------------------------- scoring
def judge(prog: Program, result: dict[str, Any]) -> dict[str, Any]:
    """Caught / false alarm, the first fitting warning's place in the run, the alarms seen."""
    alarms = [f for f in result["findings"] if f["severity"] in ALARM]
    fitting = [f for f in alarms if f["check"] in prog.expected_checks]
    planned = result.get("planned_steps") or result.get("steps_done") or 1

    def fraction(f: dict[str, Any]) -> float:
        return 0.0 if f.get("source") == "preflight" else min(1.0, f["step"] / max(1, planned))

    return {
        "caught": bool(fitting) if prog.kind == "bug" else None,
        "false_alarm": bool(alarms) if prog.kind == "healthy" else None,
        "first_fraction": min(map(fraction, fitting)) if fitting else None,
        "alarms": sorted({f["check"] for f in alarms}),
        "internal_errors": [f["message"] for f in result["findings"] if f["check"] == "internal_error"],
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _status_note(rows: list[dict[str, Any]]) -> str:
    counts = collections.Counter(r["status"] for r in rows if r["status"] != "ok")
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def detection_report(programs: dict[str, Program], results: list[dict[str, Any]], wall: float) -> tuple[str, dict[str, Any]]:
    by_prog: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in results:
        r["judged"] = judge(programs[r["program"]], r)
        by_prog[r["program"]].append(r)
    lines = [
        "| program | kind | phase | result | first fitting warning | warnings/errors seen (runs) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in by_prog.items():
        prog = programs[name]
        n = len(rows)
        seen = collections.Counter(c for r in rows for c in r["judged"]["alarms"])
        seen_txt = ", ".join(
            (f"**{c}**" if c in prog.expected_checks else c) + (f"×{k}" if k > 1 else "")
            for c, k in sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))
        ) or "–"
        if prog.kind == "bug":
            k = sum(r["judged"]["caught"] for r in rows)
            result = f"{k}/{n} caught" + ("" if k == n else " ✗")
            fr = [r["judged"]["first_fraction"] for r in rows if r["judged"]["first_fraction"] is not None]
            first = _fmt(_mean(fr)) if fr else "–"
        else:
            k = sum(r["judged"]["false_alarm"] for r in rows)
            result = f"{k}/{n} false alarm" + (" ✗" if k else "")
            first = ""
        note = _status_note(rows)
        if note:
            result += f" ({note})"
        phase = prog.phase if prog.kind == "bug" else ""
        lines.append(f"| {name} | {prog.kind} | {phase} | {result} | {first} | {seen_txt} |")

    bug_runs = [r for r in results if r["kind"] == "bug"]
    healthy_runs = [r for r in results if r["kind"] == "healthy"]
    caught = sum(r["judged"]["caught"] for r in bug_runs)
    alarms = sum(r["judged"]["false_alarm"] for r in healthy_runs)
    inflight = [r["judged"]["first_fraction"] for r in bug_runs
                if programs[r["program"]].phase == "inflight" and r["judged"]["first_fraction"] is not None]
    everything = [r["judged"]["first_fraction"] for r in bug_runs if r["judged"]["first_fraction"] is not None]
    internal = [(r["program"], r["seed"], m) for r in results for m in r["judged"]["internal_errors"]]
    bug_programs = [p for p in by_prog if programs[p].kind == "bug"]
    all_seeds = sum(all(r["judged"]["caught"] for r in by_prog[p]) for p in bug_programs)
    summary = {
        "bug_runs": len(bug_runs),
        "bug_runs_caught": caught,
        "bug_catch_rate": caught / len(bug_runs) if bug_runs else None,
        "bug_programs_caught_every_seed": all_seeds,
        "bug_programs": len(bug_programs),
        "healthy_runs": len(healthy_runs),
        "false_alarm_runs": alarms,
        "internal_errors": len(internal),
        "mean_first_fraction_inflight": _mean(inflight) if inflight else None,
        "mean_first_fraction_all_bugs": _mean(everything) if everything else None,
        "wall_s": round(wall, 1),
        "cpu_s": round(sum(r.get("wall_s") or 0 for r in results), 1),
    }
    lines += [
        "",
        f"- **bugs caught: {caught}/{len(bug_runs)} runs ({100 * caught / max(1, len(bug_runs)):.1f}%)**; "
        f"{all_seeds}/{len(bug_programs)} bug programs caught under every seed",
        f"- **false alarms: {alarms}/{len(healthy_runs)} healthy runs**",
        f"- internal errors: {len(internal)}",
        f"- mean first fitting warning, in-flight bugs: **{_fmt(summary['mean_first_fraction_inflight'])}** of the run "
        f"({len(inflight)} caught runs); all bugs: {_fmt(summary['mean_first_fraction_all_bugs'])}",
        f"- wall time {wall:.0f} s ({summary['cpu_s']:.0f} s in programs)",
    ]
    misses = [r for r in bug_runs if not r["judged"]["caught"]]
    false = [r for r in healthy_runs if r["judged"]["false_alarm"]]
    if misses:
        lines += ["", "Misses (bug run, no fitting warning):"]
        for r in misses:
            lines.append(f"- {r['program']} seed {r['seed']}: expected {sorted(programs[r['program']].expected_checks)}, "
                         f"saw {r['judged']['alarms'] or 'nothing'}" + (f" [{r['status']}]" if r["status"] != "ok" else ""))
    if false:
        lines += ["", "False alarms:"]
        for r in false:
            for f in r["findings"]:
                if f["severity"] in ALARM:
                    lines.append(f"- {r['program']} seed {r['seed']}: {f['severity']} {f['check']}"
                                 f"{' [' + f['target'] + ']' if f.get('target') else ''} at step {f['step']}: {f['message']}")
    if internal:
        lines += ["", "Internal errors:"]
        lines += [f"- {p} seed {s}: {m}" for p, s, m in internal]
    crashed = [r for r in results if r["status"] in ("crashed", "timeout")]
    if crashed:
        lines += ["", "Crashed or timed out:"]
        lines += [f"- {r['program']} seed {r['seed']} ({r['status']}): {(r['error'] or '').splitlines()[0][:300]}" for r in crashed]
    return "\n".join(lines), summary


def sanity_report(programs: dict[str, Program], results: list[dict[str, Any]], wall: float) -> tuple[str, dict[str, Any]]:
    by_prog: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in results:
        by_prog[r["program"]].append(r)
    lines = [
        "| program | kind | train loss first → last | val loss | val acc / R² | non-finite loss steps | steps | s/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in by_prog.items():
        m = [r["metrics"] for r in rows if r.get("metrics")]

        def avg(get):
            vals = [get(x) for x in m]
            vals = [v for v in vals if v is not None]
            return _mean(vals) if vals else None

        first = avg(lambda x: x.get("first_loss"))
        last = avg(lambda x: x.get("final_loss"))
        vloss = avg(lambda x: x["val"].get("val_loss"))
        vacc = avg(lambda x: x["val"].get("val_acc", x["val"].get("val_r2")))
        nonfinite = [x.get("nonfinite_loss_steps", 0) for x in m]
        note = _status_note(rows)
        lines.append(
            f"| {name} | {programs[name].kind} | {_fmt(first)} → {_fmt(last)} | {_fmt(vloss)} | {_fmt(vacc)} | "
            f"{'/'.join(map(str, nonfinite))} | {rows[0].get('steps_done')} | {_fmt(_mean([r['wall_s'] or 0 for r in rows]), 1)}"
            f"{' (' + note + ')' if note else ''} |"
        )
    lines += ["", f"wall time {wall:.0f} s; means over seeds; non-finite counts per seed"]
    crashed = [r for r in results if r["status"] != "ok"]
    for r in crashed:
        lines.append(f"- {r['program']} seed {r['seed']} ({r['status']}): {(r['error'] or '').splitlines()[0][:300]}")
    return "\n".join(lines), {"wall_s": round(wall, 1)}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (default 3)")
    ap.add_argument("--only", default=None, help="comma-separated program names or globs")
    ap.add_argument("--kind", choices=("bug", "healthy"), default=None, help="only bug or only healthy programs")
    ap.add_argument("--jobs", type=int, default=1, help="programs run at once, each in its own process (default 1)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per program run before it is killed (default 180)")
    ap.add_argument("--json", default=None, help="write every run, finding and the summary here")
    ap.add_argument("--no-flightcheck", action="store_true", help="sanity mode: train without flightcheck, print losses and accuracy")
    ap.add_argument("--no-activation-monitor", action="store_true", help="leave out the opt-in ActivationMonitor")
    ap.add_argument("--logger", choices=("tensorboard", "csv", "none"), default="tensorboard", help="logger (in a temp dir)")
    ap.add_argument("--list", action="store_true", help="print the programs as a markdown table and exit")
    args = ap.parse_args(argv)

    programs = all_programs()
    chosen = list(programs.values())
    if args.only:
        pats = [p.strip() for p in args.only.split(",") if p.strip()]
        chosen = [p for p in chosen if any(fnmatch.fnmatchcase(p.name, pat) for pat in pats)]
    if args.kind:
        chosen = [p for p in chosen if p.kind == args.kind]
    if args.list:
        print("| program | kind | phase | what it is | expected checks |\n| --- | --- | --- | --- | --- |")
        for p in chosen:
            checks = ", ".join(f"`{c}`" for c in sorted(p.expected_checks)) or "– (any warning is a false alarm)"
            print(f"| `{p.name}` | {p.kind} | {p.phase if p.kind == 'bug' else ''} | {p.summary} | {checks} |")
        return 0
    if not chosen:
        print(f"no program matches {args.only!r}", file=sys.stderr)
        return 2

    opts = dict(flightcheck_on=not args.no_flightcheck, activation_monitor=not args.no_activation_monitor, logger_kind=args.logger)
    if not args.no_flightcheck:
        _, status = make_callbacks(not args.no_activation_monitor)
        print("callbacks: " + "; ".join(f"{k}: {v}" for k, v in status.items()), file=sys.stderr)
    tasks = [(p, s) for p in chosen for s in range(args.seeds)]
    done = [0]

    def progress(r: dict[str, Any]) -> None:
        done[0] += 1
        alarms = sorted({f["check"] for f in r.get("findings", []) if f["severity"] in ALARM})
        print(f"[{done[0]}/{len(tasks)}] {r['program']} seed {r['seed']}: {r['status']} {r.get('wall_s')}s"
              f"{' alarms=' + ','.join(alarms) if alarms else ''}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results = run_all(tasks, opts, max(1, args.jobs), args.timeout, progress)
    wall = time.perf_counter() - t0
    report = sanity_report if args.no_flightcheck else detection_report
    table, summary = report(programs, results, wall)
    print(table)
    if args.json:
        meta = {"argv": sys.argv[1:], "python": platform.python_version(), "torch": torch.__version__,
                "lightning": pl.__version__, "flightcheck": getattr(flightcheck, "__version__", "?")}
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
