"""DeepSpeed ZeRO-1/2/3 backend (:mod:`.backend`), the start-up layout (:mod:`.startup`) and
resume (:mod:`.resume`).  Engine internals are fenced in
:mod:`spectrum_callback._fence.deepspeed_internals`."""
from ..._fence.deepspeed_internals import TESTED_DEEPSPEED_STR, check_deepspeed_version
from .backend import LAYOUT_KEY, DeepSpeedBackend
from .resume import lay_out_as_saved, rebind
from .startup import split_for_dynamic

__all__ = ["DeepSpeedBackend", "lay_out_as_saved", "rebind", "split_for_dynamic", "check_deepspeed_version",
           "TESTED_DEEPSPEED_STR", "LAYOUT_KEY"]
