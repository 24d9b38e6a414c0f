#!/usr/bin/env python
"""One trial of the NNI pruning search (started by NNI; see tools/nni_search.py).

Reads the experiment's fixed settings (--settings JSON), takes the tuner's parameters from
``nni.get_next_parameter()`` (or --params JSON when run by hand), prunes the dense benchmark
model, fine-tunes it (distilling from the dense model when the trial's ``distill`` parameter, or
the experiment's fixed one, says so) and reports intermediate and final accuracy with MACs and
what was distilled to NNI (and the latency kept on the experiment's latency backend, when the
search measures latency).

    python tools/nni_trial.py --settings out/settings.json --params '{"criterion": "kcp"}'
    python tools/nni_trial.py --settings out/settings.json \
        --params '{"criterion": "kcp", "distill": "kl+features"}'
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import kcp_plugin  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcp_plugin.bench.nni_search import trial_main

if __name__ == "__main__":
    result = trial_main()
    print({k: v for k, v in result.items() if k != "history"})
