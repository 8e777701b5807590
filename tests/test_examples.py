"""The examples run the way a user runs them, and flightcheck says what the gallery promises.

Each example runs in a subprocess, from a scratch directory, with the flightcheck these tests
import. The gallery runs once, all its broken models in one process (``run_all.py``: one
import of torch and Lightning instead of ten), and each bug is then judged from the
``findings.jsonl`` its run wrote.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import flightcheck
from flightcheck.preflight.registry import registered

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GALLERY = EXAMPLES / "gallery"

#: each broken model of the gallery and the check that must catch it (as examples/gallery/README.md says)
GALLERY_CATCHES = {
    "forgot_zero_grad": "grad_explosion",
    "softmax_before_cross_entropy": "output_activation",
    "labels_shuffled": "overfitting",
    "lr_too_high": "overfit_batch",
    "frozen_layer": "gradient_flow",
    "dead_relus": "gradient_flow",
    "nan_from_log": "nonfinite",
    "unnormalised_inputs": "input_scale",
    "reads_the_target": "target_leakage",
    "batch_mixed_by_view": "batch_independence",
}


def run_example(*args: object, cwd: Path, timeout: float = 180, **env_vars: str) -> subprocess.CompletedProcess:
    # one thread per process, as conftest.py gives the in-process tests: tiny models run fastest so
    env = dict(os.environ, FLIGHTCHECK_EXAMPLES_FAST="1", OMP_NUM_THREADS="1", **env_vars)
    # the examples import the same flightcheck as these tests, installed or not
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(flightcheck.__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def read_findings(log_dir: Path) -> list[dict]:
    path = log_dir / "flightcheck" / "findings.jsonl"
    if not path.exists():  # no finding at all: the file is never created
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def alarms(findings: list[dict]) -> list[str]:
    return [f["check"] for f in findings if f["severity"] in ("warning", "error")]


@pytest.fixture(scope="module")
def gallery_logs(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("gallery")
    proc = run_example(GALLERY / "run_all.py", "--logdir", logdir, cwd=logdir)
    assert "| bug | check | caught |" in proc.stdout, proc.stdout[-4000:]
    return logdir


def test_every_gallery_script_is_listed_here():
    scripts = {p.stem for p in GALLERY.glob("*.py")} - {"harness", "run_all"}
    assert scripts == set(GALLERY_CATCHES)


@pytest.mark.parametrize("bug", list(GALLERY_CATCHES))
def test_gallery_bug_is_caught_by_its_check(gallery_logs, bug):
    check = GALLERY_CATCHES[bug]
    if check not in registered() and check in flightcheck.PREFLIGHT_CHECKS:
        pytest.skip(f"the {check} pre-flight check is not in this build yet")
    found = read_findings(gallery_logs / bug / "version_0")
    assert check in alarms(found), f"{bug}: expected {check}, flightcheck reported {alarms(found)}"


def test_a_gallery_script_runs_on_its_own(tmp_path):
    proc = run_example(GALLERY / "softmax_before_cross_entropy.py", "--logdir", tmp_path, cwd=tmp_path)
    assert "caught by `output_activation`" in proc.stdout
    assert "output_activation" in alarms(read_findings(tmp_path / "softmax_before_cross_entropy" / "version_0"))


def test_quickstart_healthy_run_passes_preflight_and_stays_quiet(tmp_path):
    run_example(EXAMPLES / "quickstart.py", "--epochs", "1", "--logdir", tmp_path, cwd=tmp_path)
    log_dir = tmp_path / "quickstart" / "version_0"
    report = json.loads((log_dir / "flightcheck" / "preflight_report.json").read_text())
    assert report["failed"] is False
    assert alarms(read_findings(log_dir)) == []


def test_quickstart_lr_bug_is_reported(tmp_path):
    run_example(EXAMPLES / "quickstart.py", "--bug", "lr", "--epochs", "1", "--logdir", tmp_path, cwd=tmp_path)
    assert "overfit_batch" in alarms(read_findings(tmp_path / "quickstart" / "version_0"))


@pytest.fixture
def webhook():
    """A local chat webhook: collects the JSON bodies posted to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alerts_reach_the_webhook_once_per_check_and_severity(tmp_path, webhook):
    url, received = webhook
    proc = run_example(EXAMPLES / "alerts.py", "--logdir", tmp_path, cwd=tmp_path, FLIGHTCHECK_ALERT_WEBHOOK=url)
    assert received, proc.stdout[-4000:]
    assert "ALERT " not in proc.stdout  # with a webhook set, nothing falls back to printing
    posted = [re.search(r"flightcheck (\w+): (\w+)", body["text"]).groups() for body in received]
    assert {severity for severity, _ in posted} <= {"WARNING", "ERROR"}
    assert len(set(posted)) == len(posted)  # a check alerts again only when it escalates
    warned = set(alarms(read_findings(tmp_path / "alerts" / "version_0")))
    assert {check for _, check in posted} == warned  # every check that warned reached the channel


def test_alert_hook_skips_info_holds_back_repeats_and_sends_escalations(capsys):
    alert = load_example("alerts").WebhookAlert(url=None)
    for check, severity, target in [
        ("loss_spike", "info", "train_loss"),
        ("grad_vanishing", "warning", "net.0"),
        ("grad_vanishing", "warning", "net.2"),  # the same problem in another layer
        ("grad_vanishing", "error", "net.0"),  # worse
    ]:
        alert(flightcheck.Finding(check=check, severity=severity, message="seen", target=target))
    assert [(f.check, f.severity.value) for f in alert.sent] == [("grad_vanishing", "warning"), ("grad_vanishing", "error")]
    assert alert.suppressed == 1
    assert capsys.readouterr().out.count("ALERT ") == 2
