"""DeepSpeed ZeRO-1/2/3 backend: the backend (:mod:`.backend`) and resume (:mod:`.resume`).
Engine internals are fenced in :mod:`spectrum_callback._fence.deepspeed_internals`."""
from ..._fence.deepspeed_internals import TESTED_DEEPSPEED_STR, check_deepspeed_version
from .backend import LAYOUT_KEY, DeepSpeedBackend
from .resume import backend_for, install_resume_hook, lay_out_as_saved
from .startup import install_startup_hook

__all__ = ["DeepSpeedBackend", "backend_for", "install_resume_hook", "install_startup_hook",
           "lay_out_as_saved", "check_deepspeed_version",
           "TESTED_DEEPSPEED_STR", "LAYOUT_KEY"]
