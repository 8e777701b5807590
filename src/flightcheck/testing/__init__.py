"""Helpers for pytest: run flightcheck's pre-flight checks on every commit, count host-device syncs.

Example::

    from flightcheck.testing import assert_overfits, assert_gradients_flow

    def test_model_can_learn():
        assert_overfits(MyModel(), my_batch)
"""

from flightcheck.testing.preflight import (
    assert_batch_independent,
    assert_causal,
    assert_gradients_flow,
    assert_init_loss,
    assert_no_split_overlap,
    assert_no_target_leakage,
    assert_overfits,
    run_preflight,
)
from flightcheck.testing.syncs import SyncCounter

__all__ = [
    "SyncCounter",
    "assert_batch_independent",
    "assert_causal",
    "assert_gradients_flow",
    "assert_init_loss",
    "assert_no_split_overlap",
    "assert_no_target_leakage",
    "assert_overfits",
    "run_preflight",
]
