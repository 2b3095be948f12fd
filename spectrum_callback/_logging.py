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

from ._dist import is_main

ROOT = "spectrum_callback"


_configured = set()  # ids of the root loggers this module set up


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if id(root) not in _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
        root.propagate = False
        _configured.add(id(root))
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


_said: set = set()


def warn_once(logger: logging.Logger, key: str, msg: str, *args, main_only: bool = True) -> bool:
    """Log ``msg % args`` as a WARNING the first time ``key`` is seen in this process (on the
    main rank only, unless ``main_only=False``); returns whether it was logged now."""
    if key in _said:
        return False
    _said.add(key)
    if main_only and not is_main():
        return False
    logger.warning(msg, *args)
    return True


def forget_warnings(*keys: str) -> None:
    """Let :func:`warn_once` say these again (all when no key is given): for tests."""
    if keys:
        _said.difference_update(keys)
    else:
        _said.clear()
