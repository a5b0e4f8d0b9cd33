"""Design: the ``isa`` scenario's worker, one process per ISA module.

What: ``fastadam.adam_step`` on one array per job (dtype, threads, n), timed
with the suite's own ``timing.measure`` (warm-up, calibration, medians,
re-measured when noisy), in a process started with ``FASTADAM_ISA=<isa>`` so
that fastadam imports that module (``fastadam._dispatch``): the public API
is all it calls, whatever the kernels' calling convention.

Method: reads a JSON spec on stdin -- ``{"jobs": [{"dtype", "threads",
"n"}, ...], "repeats", "target_s", "retries"}`` -- and writes
``{"isa": ..., "results": [timing result per job]}`` on stdout. It never
imports torch (the parent alternates the workers' order over rounds).
"""
import json
import sys

import numpy as np


def main():
    spec = json.load(sys.stdin)
    import fastadam as fa

    from . import peers as P
    from .timing import measure
    out = []
    for job in spec["jobs"]:
        n, t = job["n"], job["threads"]
        case = P.Dense([n], job["dtype"], t)
        p, g, m, v = (x[0] for x in case.buffers())

        def step(p=p, g=g, m=m, v=v, t=t):
            fa.adam_step(p, g, m, v, step=10, lr=P.LR, n_threads=t)
        with P.threads(t):
            res = measure({"step": step}, repeats=spec["repeats"], target_s=spec["target_s"],
                          retries=spec["retries"])["step"]
        res["samples"] = [float(x) for x in res["samples"]]
        out.append(res)
        case.free()
    json.dump({"isa": fa.isa, "numpy": np.__version__, "results": out}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
