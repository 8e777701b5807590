"""Alerts from a long run: flightcheck's ``on_finding`` hook posting to a chat webhook.

    python examples/alerts.py                                        # offline: alerts are printed
    FLIGHTCHECK_ALERT_WEBHOOK=https://hooks.slack.com/services/... python examples/alerts.py

A run that lasts days is not watched. ``flightcheck.default_callbacks(on_finding=...)`` calls a
function with every new finding, on global rank 0 only, so one process sends each alert. The
:class:`WebhookAlert` below is such a function. It:

- lets through only ``warning`` and ``error`` findings (``info`` ones stay in the logs);
- sends one alert per check: flightcheck already reports a persisting problem once per
  (check, target), but one problem often touches many targets (a gradient explosion in every
  layer), and a pager should ring once. A later finding of the same check is sent again only
  when it is more severe (an escalation), or after ``repeat_after_s``;
- posts JSON ``{"text": ...}`` (what Slack, Mattermost and Teams incoming webhooks take) from a
  background thread with a timeout, so a slow or dead webhook never holds up training; without
  a URL it prints the alert instead.

The run here reads a data feed in which about 1% of the records arrive in the wrong units (a
sensor that reports millivolts instead of volts). The pre-flight looks at one batch, without
such a record, and passes; the damage comes later, whenever a bad record is drawn, and the
alerts arrive as it happens, not at the end. Runs in well under a minute on a CPU; ``--fast``
(or ``FLIGHTCHECK_EXAMPLES_FAST=1``) runs fewer epochs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
import urllib.request

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flightcheck
from flightcheck import Finding, Severity
from flightcheck.synthetic import GaussianClusters

WEBHOOK_ENV = "FLIGHTCHECK_ALERT_WEBHOOK"
log = logging.getLogger(__name__)


class WebhookAlert:
    """An ``on_finding`` hook: one chat message per check, for warnings and errors.

    Args:
        url: the incoming-webhook URL; ``None`` prints the alerts instead of posting them.
        run_name: named in every message, to tell runs apart in a shared channel.
        min_severity: the least severe finding that alerts (``"warning"`` or ``"error"``).
        repeat_after_s: send a check again, at the same severity, after this many seconds
            (a day by default: a problem that is still there tomorrow is worth a reminder).
        timeout_s: how long one post may take; it runs in a background thread either way.
    """

    def __init__(
        self,
        url: str | None,
        run_name: str = "run",
        min_severity: str = "warning",
        repeat_after_s: float = 24 * 3600,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.run_name = run_name
        self.min_severity = Severity.coerce(min_severity)
        self.repeat_after_s = repeat_after_s
        self.timeout_s = timeout_s
        self.sent: list[Finding] = []
        self.suppressed = 0
        self._last: dict[str, tuple[Severity, float]] = {}  # check -> (severity sent, when)
        self._threads: list[threading.Thread] = []

    def __call__(self, finding: Finding) -> None:
        if finding.severity.rank < self.min_severity.rank:
            return
        now = time.monotonic()
        last = self._last.get(finding.check)
        if last is not None:
            severity, when = last
            if finding.severity.rank <= severity.rank and now - when < self.repeat_after_s:
                self.suppressed += 1
                return
        self._last[finding.check] = (finding.severity, now)
        self.sent.append(finding)
        self._send(self.text(finding))

    def text(self, finding: Finding) -> str:
        where = f" in {finding.target}" if finding.target else ""
        lines = [
            f"[{self.run_name}] flightcheck {finding.severity.value.upper()}: {finding.check}{where} "
            f"at step {finding.step} (epoch {finding.epoch})",
            finding.message,
        ]
        if finding.advice:
            lines.append("Try: " + finding.advice[0])
        return "\n".join(lines)

    def _send(self, text: str) -> None:
        if not self.url:
            print("ALERT " + text.replace("\n", "\n      "), flush=True)
            return
        thread = threading.Thread(target=self._post, args=(text,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _post(self, text: str) -> None:
        request = urllib.request.Request(
            self.url,  # type: ignore[arg-type]
            data=json.dumps({"text": text}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except Exception as err:  # noqa: BLE001 - an alert that cannot be sent must not end the run
            log.warning("alert not delivered to the webhook (%r): %s", err, text.splitlines()[0])

    def flush(self) -> None:
        """Wait for posts still in flight (at the end of the run)."""
        for thread in self._threads:
            thread.join(self.timeout_s)
        self._threads.clear()


class Classifier(L.LightningModule):
    """An MLP classifier, SGD with momentum: a healthy model."""

    def __init__(self, dim: int, num_classes: int, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def sensor_feed(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Clean validation data, and training data in which ~1% of the records are 1000x too large."""
    dm = GaussianClusters(num_classes=4, dim=16, n_train=2048, n_val=256, seed=seed)
    x, y = dm.train_set.tensors
    g = torch.Generator().manual_seed(seed + 3)
    wrong_units = torch.rand(len(x), generator=g) < 0.01
    x = torch.where(wrong_units[:, None], x * 1000.0, x)  # THE BUG: millivolts in a feed of volts
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return train, dm.val_dataloader()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fast = os.environ.get("FLIGHTCHECK_EXAMPLES_FAST", "").strip().lower() not in ("", "0", "false", "no")
    parser.add_argument("--fast", action="store_true", default=fast, help="fewer epochs")
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (2 with --fast)")
    parser.add_argument("--logdir", default="flightcheck_logs")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    url = os.environ.get(WEBHOOK_ENV) or None
    print(f"alerts go to {'the webhook in $' + WEBHOOK_ENV if url else 'this console (set $' + WEBHOOK_ENV + ')'}")
    alert = WebhookAlert(url, run_name="alerts-example")

    L.seed_everything(0, verbose=False)
    train, val = sensor_feed()
    trainer = L.Trainer(
        max_epochs=args.epochs or (2 if args.fast else 10),
        accelerator="cpu",
        callbacks=flightcheck.default_callbacks(on_finding=alert),
        logger=TensorBoardLogger(args.logdir, name="alerts"),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(dim=16, num_classes=4), train, val)
    alert.flush()

    found = flightcheck.findings(trainer)
    alarms = [f for f in found if f.severity is not Severity.INFO]
    print(
        f"\n{len(found)} finding(s), {len(alarms)} of them warnings or errors; {len(alert.sent)} alert(s) sent, "
        f"{alert.suppressed} held back as repeats of a check already alerted."
    )
    print(f"Every finding is in {os.path.join(trainer.log_dir, 'flightcheck', 'findings.jsonl')}")


if __name__ == "__main__":
    main()
