"""The package's loggers, set up the way transformers sets up its own.

* One stderr handler on the package's root logger ``spectrum_callback`` (which does not
  propagate, so nothing prints twice), formatted like transformers' messages.
* Routine messages (a scan's summary, a restored selection) are INFO, problems WARNING.
* Under the Trainer the level follows ``TrainingArguments.log_level`` /
  ``log_level_replica`` (:func:`follow_trainer`), as transformers' loggers do; outside it,
  WARNING.
"""
from __future__ import annotations

import logging
import sys

ROOT = "spectrum_callback"


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not getattr(root, "_spectrum_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
        root.propagate = False
        root._spectrum_configured = True
    return root


def get_logger(name: str) -> logging.Logger:
    _root()
    return logging.getLogger(name)


def follow_trainer(args) -> None:
    """Use the log level the Trainer uses on this process (``get_process_log_level``)."""
    get_level = getattr(args, "get_process_log_level", None)
    if get_level is None:
        return
    try:
        _root().setLevel(int(get_level()))
    except Exception:  # an args object of another shape: keep the current level
        pass
