"""fastadam's microbenchmark suite: ``python -m fastadam.bench --help``.

Peers run side by side in one process on the same buffers, interleaved
(A B C, C B A, ...), with warm-up, medians and min/max over repeats. The
machine's memory bandwidth is measured in the same run and every dense result
is reported as a fraction of the bandwidth bound (28 bytes/element float32,
56 float64); sparse results are reported against the bytes of the touched rows.

Modules: ``timing`` (interleaved timer, progress bar), ``machine`` (machine
description, bandwidth probe), ``peers`` (the implementations compared),
``scenarios`` (dense, overhead, many, sparse, isa, threshold), ``report``
(terminal table, JSON, Markdown, plots), ``cli`` (modes and filters).
"""
__version__ = "0.1.0"
