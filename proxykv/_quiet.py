"""transformers' own output (progress bars, info and warning logs) silenced around a block, for
the commands and conversions that print their own progress."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def transformers_output(verbose: bool):
    """transformers' progress bars ("Loading weights") and its info and warning logs: silenced
    inside unless ``verbose``, and restored as they were afterwards (also after an exception)."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
