"""ZeRO stage 3: the per-stage steps of a rebuild.

Stage 3 partitions each parameter on its own, so a stayer's slice on a rank is the same in
the new optimizer whatever the grouping: its local fp32 master and Adam state are copied
as they are (``deepspeed.utils.safe_get_local_*``, public) and written back the same way
(``safe_set_local_*``), nothing sent between ranks.  The param groups are one per (class,
Adam step) cohort.  The weights are partitioned too: a scan gathers them.
"""
from __future__ import annotations

from ..._fence import deepspeed_internals as ds
from .stage import ZeroStage


class Stage3(ZeroStage):
    """ZeRO-3: local slices copied and written back, one group per cohort (module doc)."""

    def gather(self, modules):
        # a candidate's parameters: the weight, a parametrization's originals, a fused bank
        return ds.gathered([p for m in modules for p in getattr(m, "params", [m.weight])])

    def reusable(self, zero, old_groups, new_params, force_fresh, keys):
        return {}  # a cohort's flat partition changes with its members: every stayer is copied

    def link_state(self, zero, keys):
        pass  # safe_get_local_* read through the optimizer itself: nothing to link

    def copy_local(self, p, key, dev):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        v = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
        return None if v is None else v.detach().to(dev, copy=True)

    def write_local(self, p, key, value):
        if value is None:
            return
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        value = value.to(ds.device_of(p))
        if key is None:
            safe_set_local_fp32_param(p, value)
        else:
            safe_set_local_optimizer_state(p, value, key)

    def groups(self, entries):
        """One group per (class, step) cohort, classes in order and the oldest cohort first."""
        cohorts = {}
        for c, step, p in entries:
            cohorts.setdefault((c, step), []).append(p)
        return [(c, step, cohorts[(c, step)]) for c, step in sorted(cohorts, key=lambda cs: (cs[0], -cs[1]))]

    def configure(self, engine, base, reuse):
        return ds.configure_optimizer(engine, base), 0  # nothing is reused at stage 3
