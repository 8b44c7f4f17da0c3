"""Helpers shared by proxykv's tests (imported by tests only, never by the library)."""

from proxykv.testing.assertions import TOLERANCES, assert_close, assert_same_topk_scores
from proxykv.testing.poison import poison_empty_allocations

__all__ = ["TOLERANCES", "assert_close", "assert_same_topk_scores", "poison_empty_allocations"]
