"""The quality study, and what the demo and the benchmarks share with it: the methods
compared (:mod:`.methods`), the memory probe, and the offline weights and text
(:mod:`.assets`).  Not part of the library: ``spectrum_callback`` never imports it,
except the ``spectrum-scan`` CLI for its offline model alias.
"""
