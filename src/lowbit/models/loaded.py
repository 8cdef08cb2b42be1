"""The record of a loaded model, and the helpers that every reader of model files shares."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass
class LoadedModel:
    """A model ready to run: ``model`` in eval mode, its ``tokenizer``, and where it came from."""

    model: nn.Module
    tokenizer: object
    source: str
    path: Path | None = None


def quiet_transformers() -> None:
    """transformers' logging, progress bars and warnings off: lowbit says what matters itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def first_line(e: BaseException) -> str:
    """An exception's message in one line (at most 300 characters), for a one-line error."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
