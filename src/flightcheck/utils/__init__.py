"""Small shared helpers: RNG and module-mode preservation, walking nested batches."""

from flightcheck.utils.batch import batch_size_of, step_loss, tensors_in
from flightcheck.utils.state import modes_preserved, preserved_rng

__all__ = ["batch_size_of", "modes_preserved", "preserved_rng", "step_loss", "tensors_in"]
