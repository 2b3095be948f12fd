#!/usr/bin/env python
"""What ``park_state=True`` costs: host memory held by the parked moments and the time it
adds to a switch, against the same schedule without parking, in the same process.

A random Llama (``--layers`` layers, ``--hidden``, intermediate 2.75x hidden, fp32) trains
in a plain PyTorch loop with ``SpectrumSession`` and AdamW, one random batch per step; the
policy (``rotate`` by default: the active 25 % moves through the top 50 % by SNR) gives a new
selection every ``--every`` steps. Each variant (parked, dropped) runs ``--switches``
switches; reported per variant:

* ``switch_seconds``: median wall time of ``maybe_switch`` at a switch step (the backend's
  switch plus the bookkeeping; no scan: rotate scans once at start, random never);
* ``parked_bytes``: host bytes held by parked moments after each switch (the largest);
* ``optimizer_state_bytes``: the optimizer's own state (the device side) after the step that
  follows a switch, which parking must not grow;
* ``step_seconds``: median time of an optimizer step without a switch.

The ratios (parked / dropped) are the figures to read: both variants run in the same
process, so the ratios hold under a load that makes absolute times vary.

    python benchmarks/park.py --hidden 1024 --json docs/results/bench_park_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch


def _model(hidden: int, layers: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=int(2.75 * hidden) // 64 * 64,
                                   num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                   num_key_value_heads=max(1, hidden // 256), vocab_size=1024,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _state_bytes(opt) -> int:
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim > 0)


def run_variant(park: bool, args) -> dict:
    from spectrum_callback import SpectrumConfig, SpectrumSession

    device = torch.device(args.device)
    model = _model(args.hidden, args.layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = SpectrumConfig(top_pct=0.25, update_every=args.every, policy=args.policy, park_state=park, verbose=False,
                         seed=0)
    session = SpectrumSession(model, opt, cfg)
    session.start()
    gen = torch.Generator().manual_seed(1)
    switch_s, step_s, parked, state = [], [], [], []
    steps = args.every * args.switches + 1
    for step in range(steps):
        t0 = time.perf_counter()
        session.maybe_switch(step)
        switched = step and step % args.every == 0
        if switched:
            switch_s.append(time.perf_counter() - t0)
        ids = torch.randint(0, 1024, (args.batch, args.seq), generator=gen).to(device)
        t1 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if switched:  # after the step, every active matrix has its state
            parked.append(session.backend.parked_bytes() if park else 0)
            state.append(_state_bytes(opt))
        else:
            step_s.append(time.perf_counter() - t1)
    changed = [len(h["joined"]) for h in session.history[1:]]
    session.close()
    return {"park_state": park, "switch_seconds": statistics.median(switch_s), "switch_seconds_all": switch_s,
            "parked_bytes": max(parked), "optimizer_state_bytes_max": max(state),
            "optimizer_state_bytes_min": min(state), "step_seconds": statistics.median(step_s),
            "joined_per_switch": changed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--policy", choices=["rotate", "random", "cyclic"], default="rotate")
    ap.add_argument("--every", type=int, default=2, help="steps between selections")
    ap.add_argument("--switches", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="file to add this configuration's record to")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dropped, parked = run_variant(False, args), run_variant(True, args)
    record = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
        "dropped": dropped, "parked": parked,
        "switch_seconds_ratio": parked["switch_seconds"] / dropped["switch_seconds"],
        "step_seconds_ratio": parked["step_seconds"] / dropped["step_seconds"],
        "parked_bytes_over_state": parked["parked_bytes"] / max(1, parked["optimizer_state_bytes_max"]),
        "state_bytes_ratio": parked["optimizer_state_bytes_max"] / max(1, dropped["optimizer_state_bytes_max"]),
    }
    print(json.dumps({k: v for k, v in record.items() if k not in ("dropped", "parked")}, indent=1))
    for name in ("dropped", "parked"):
        r = record[name]
        print(f"{name:>8}: switch {r['switch_seconds'] * 1e3:.1f} ms, step {r['step_seconds'] * 1e3:.0f} ms, "
              f"optimizer state {r['optimizer_state_bytes_max'] / 2**20:.1f} MiB, "
              f"parked {r['parked_bytes'] / 2**20:.1f} MiB, joined per switch {r['joined_per_switch']}")
    if args.json:
        old = json.load(open(args.json)) if os.path.isfile(args.json) else []
        key = json.dumps(record["config"], sort_keys=True)
        old = [r for r in old if json.dumps(r["config"], sort_keys=True) != key] + [record]
        with open(args.json, "w") as fh:
            json.dump(old, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
