"""Data modules with known answers: ask "can this model learn at all?" before blaming the data.

Each module generates its data in memory from a ``seed`` (same seed, identical tensors; the
global random streams are left alone) and says how well a working model should do on it::

    from flightcheck.synthetic import GaussianClusters

    dm = GaussianClusters(num_classes=3, dim=16, seed=0)
    trainer.fit(model, datamodule=dm)
    print(dm.describe())   # the task, and e.g. expected_accuracy 0.959, chance_accuracy 0.333

If a model cannot get near the stated figure here, the bug is in the model or the training
loop, not in the user's data.
"""

from flightcheck.synthetic.base import SyntheticDataModule
from flightcheck.synthetic.classification import GaussianClusters
from flightcheck.synthetic.functional import box_iou, mean_iou
from flightcheck.synthetic.regression import KnownFunctionRegression
from flightcheck.synthetic.sequences import SequenceClassification
from flightcheck.synthetic.vision import ShapesDetection, ShapesSegmentation

__all__ = [
    "GaussianClusters",
    "KnownFunctionRegression",
    "SequenceClassification",
    "ShapesDetection",
    "ShapesSegmentation",
    "SyntheticDataModule",
    "box_iou",
    "mean_iou",
]
