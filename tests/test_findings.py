"""The findings record, de-duplication and the reporting path, as a user sees them."""

from __future__ import annotations

import json
import math

import pytest
import torch

import flightcheck
from flightcheck import Finding, Severity
from flightcheck.callbacks.base import FlightcheckCallback
from flightcheck.reporting.dedup import Deduplicator
from tests.conftest import TinyClassifier, loader, make_trainer


def _finding(check="grad_explosion", severity="warning", target="net.0", step=3):
    return Finding(check=check, severity=severity, message="m", target=target, step=step)


def test_unknown_check_name_is_refused():
    with pytest.raises(ValueError, match="unknown check 'grad_boom'"):
        Finding(check="grad_boom", severity="warning", message="m")


def test_unknown_severity_names_the_accepted_values():
    with pytest.raises(ValueError, match="info"):
        Finding(check="nonfinite", severity="fatal", message="m")


def test_finding_round_trips_through_json_with_tensors_and_nonfinite_numbers():
    f = Finding(check="nonfinite", severity="error", message="loss is nan", data={"loss": float("nan"),
                "norms": torch.tensor([1.0, math.inf]), "shape": (2, 3)})
    line = json.dumps(f.to_dict(), allow_nan=False)
    back = Finding.from_dict(json.loads(line))
    assert back.data == {"loss": "nan", "norms": [1.0, "inf"], "shape": [2, 3]}
    assert back.severity is Severity.ERROR and back.check == "nonfinite"


def test_persisting_problem_is_reported_once_and_rearmed_when_it_clears():
    d = Deduplicator()
    assert d.offer(_finding(step=1))
    assert not d.offer(_finding(step=2))  # same (check, target): suppressed even with new numbers
    assert d.offer(_finding(target="net.2"))  # another target is news
    assert d.clear("grad_explosion", "net.0")
    assert d.offer(_finding(step=9))  # came back after clearing


def test_worsening_problem_is_escalated():
    d = Deduplicator()
    assert d.offer(_finding(severity="warning"))
    assert d.offer(_finding(severity="error"))
    assert not d.offer(_finding(severity="warning"))


class _Reporter(FlightcheckCallback):
    name = "reporter"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx in (0, 2):
            self.report(trainer, "loss_spike", "warning", f"spike at batch {batch_idx}", target="train_loss",
                        causes=["a bad batch"], advice=["look at it"])


def test_findings_reach_file_tensorboard_hook_and_trainer(tmp_path, data):
    seen = []
    cb = _Reporter(on_finding=seen.append)
    trainer = make_trainer(tmp_path, [cb], max_steps=4)
    trainer.fit(TinyClassifier(), loader(*data))

    assert [f.message for f in seen] == ["spike at batch 0"]  # de-duplicated per (check, target)
    assert flightcheck.findings(trainer) == seen
    path = tmp_path / "logs" / "version_0" / "flightcheck" / "findings.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["check"], r["source"], r["target"]) for r in rows] == [("loss_spike", "reporter", "train_loss")]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "logs" / "version_0"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "flightcheck/findings/loss_spike/text_summary" in tags
    assert "flightcheck/findings_table/text_summary" in tags


class _Broken(FlightcheckCallback):
    name = "broken"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise ZeroDivisionError("boom")


def test_a_check_that_fails_internally_steps_aside_and_training_completes(tmp_path, data):
    cb = _Broken()
    trainer = make_trainer(tmp_path, [cb], max_steps=6)
    trainer.fit(TinyClassifier(), loader(*data))
    assert trainer.global_step == 6
    internal = [f for f in flightcheck.findings(trainer) if f.check == "internal_error"]
    assert len(internal) == 1
    assert "ZeroDivisionError" in internal[0].message and internal[0].data["hook"] == "on_train_batch_end"


def test_a_failing_user_hook_does_not_stop_training(tmp_path, data):
    def hook(finding):
        raise RuntimeError("pager down")

    trainer = make_trainer(tmp_path, [_Reporter(on_finding=hook)], max_steps=3)
    trainer.fit(TinyClassifier(), loader(*data))
    assert trainer.global_step == 3


def test_works_without_any_logger(tmp_path, data):
    cb = _Reporter()
    trainer = make_trainer(tmp_path, [cb], logger=False, max_steps=3)
    trainer.fit(TinyClassifier(), loader(*data))
    assert (tmp_path / "flightcheck" / "findings.jsonl").exists()


def test_dedup_state_survives_a_checkpoint():
    cb = _Reporter()
    cb.publish(None, _finding())
    restored = _Reporter()
    restored.load_state_dict(cb.state_dict())
    assert restored.findings == cb.findings
    assert restored.publish(None, _finding(step=99)) is None


def test_default_callbacks_rejects_unknown_override_naming_accepted_keys():
    with pytest.raises(ValueError, match="gradient_monitor"):
        flightcheck.default_callbacks(grad_monitor=False)
