"""The lab's measurement tools, apart from the user's commands in ``infer/``.

Each is a ``python -m infer.lab.NAME`` command that measures something for
BENCHMARKS.md or RESULTS.md: ``bench`` and ``bench_report`` (the latency
model over models x devices x bandwidths), ``profile_host`` (this machine's
FLOP/s and memory bandwidth), ``testbed``, ``prefill_time`` and
``collective_time`` (the bandwidth-shaped multi-process testbed),
``model_check`` (the latency model against the testbed), ``layer_time`` (one
Llama-3-8B layer), ``code_search`` (the nearest-code search's cost).  By
default they write under ``workdir/lab/``; the committed files in
``results/`` are rewritten only by the commands written beside them, which
name their output folder.
"""

import os

OUT = os.path.join("workdir", "lab")  # where the tools write unless told (git ignores it)
