"""Resource behaviour: a calibration batch that does not fit in memory is split, not a crash of the machine.

The child process limits its own address space (``RLIMIT_AS``, set by the child on itself, so the
test runner and the machine are never constrained) to its current size plus a budget:

* 64 MB for 32 images at 96x96: the full batch needs well over 150 MB of activations, so the first
  attempt fails and :func:`mixmatch_plugin.signals._batch_grads` retries in micro-batches; the scores
  must equal those of an unconstrained run (computed afterwards, in the same process);
* 16 MB for two 600x600 images: not even one sample fits (a 46 MB activation), which must be the
  one-line ``MixMatchError`` after the micro-batch retries, not a crash.

On the CPU an allocation failure surfaces as the allocator's ``RuntimeError`` ("can't allocate
memory") or, inside oneDNN convolutions, as "could not create a primitive"; both are recognised.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, logging, resource, sys
    import torch
    from torch import nn
    import mixmatch_plugin as mm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(32, 3, 96, 96, generator=g), torch.randint(0, 10, (32,), generator=g))
    huge = (torch.randn(2, 3, 600, 600, generator=g), torch.randint(0, 10, (2,), generator=g))
    # warm-up, unconstrained: oneDNN creates (and caches) a convolution primitive per batch size; creating
    # one under the limit may fail for reasons of its own ("could not create a primitive")
    for n in (32, 16, 8, 4, 2, 1):
        mm.compute_signals(model, [(batch[0][:n], batch[1][:n])])

    retries = []
    class Count(logging.Handler):
        def emit(self, record):
            if "did not fit in memory" in record.getMessage():
                retries.append(record.getMessage())
    logging.getLogger("mixmatch_plugin").addHandler(Count())

    def vm():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize"))

    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    out = {}
    # too big as one batch, fine in micro-batches
    resource.setrlimit(resource.RLIMIT_AS, (vm() + 64 * 2**20, hard))
    try:
        s = mm.compute_signals(model, [batch])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    out["retries"] = list(retries)
    reference = mm.compute_signals(model, [batch])  # unconstrained
    out["max_rel_diff"] = max(
        float(((s.score(n, "gradient") - reference.score(n, "gradient")).abs().max()
               / reference.score(n, "gradient").abs().max()))
        for n in reference.magnitude)
    # hopeless: one 600x600 sample needs a 46 MB activation (beyond glibc's 32 MB mmap threshold, so it
    # needs new address space); 16 MB of room leaves the small allocations working
    retries.clear()
    resource.setrlimit(resource.RLIMIT_AS, (vm() + 16 * 2**20, hard))
    try:
        mm.compute_signals(model, [huge])
        out["error"] = None
    except mm.MixMatchError as exc:
        out["error"] = str(exc)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    out["hopeless_retries"] = len(retries)
    print(json.dumps(out))
    """
)


def test_a_batch_too_large_for_memory_is_split_or_refused_in_one_line():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MIXMATCH_QUIET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert any("retrying in" in m for m in out["retries"]), "the full batch fitted: the limit did not constrain the run"
    assert out["max_rel_diff"] < 1e-3  # micro-batches, weighted by size, give the batch gradient (float32 sums reordered)
    assert out["error"] is not None and "ran out of memory even one sample at a time" in out["error"]
    assert "\n" not in out["error"] and out["hopeless_retries"] >= 1  # halved down to one sample first
