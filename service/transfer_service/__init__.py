"""transfer-service server: resident pretrained backbones, per-request task heads."""

import os

# Before anything loads torch (libgomp reads it once, at load): OpenMP threads waiting at a
# barrier sleep instead of spinning. libgomp's default spin-wait burns a core per waiting
# thread, so on a machine whose cores anything else also wants (another process, a
# neighbour in the node, this server's own decoding or training threads) a 2-thread team
# stalls at every barrier: 32 texts on minilm_l6 took 0.7-28 s beside busy processes,
# against 0.2-1.5 s with PASSIVE; on an otherwise idle machine PASSIVE costs 1.4-2x
# (bench/RESULTS.md, "OpenMP waiting"). Predictable beats fastest-when-alone for a shared
# service; a deployment that owns its cores may set OMP_WAIT_POLICY itself: this only fills
# in a default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
