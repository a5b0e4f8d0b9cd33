"""Design: fastadam's microbenchmark suite, ``python -m fastadam.bench --help``.

What it measures: the Adam step of fastadam (numpy API, ``fastadam.Adam``, the
``fastadam.torch`` drop-ins, the sparse path) side by side with its peers
(torch.optim Adam single/foreach/fused, SparseAdam, DeepSpeedCPUAdam when
installed, the numpy reference) and with the machine's measured memory
bandwidth.

Method: peers run in one process on the same buffers, interleaved (A B C,
C B A, ...), with warm-up, medians and min/max over repeats, re-measured when
disturbed. The memory bandwidth is measured in the same run and is the run's
ONE bound (per thread count) behind every "% of bound" in the header, the
tables and the plots; a figure above it that re-measuring does not fix is
marked ``disturbed`` instead of printed (``bound``). Only fastadam's public
and functional API is called; ISA modules are compared in worker processes
started with ``FASTADAM_ISA``. Importing ``fastadam`` never imports this
package (nor torch, nor matplotlib).

Modules: ``timing`` (interleaved timer, progress bar), ``machine`` (machine
description, bandwidth probe), ``bound`` (the one bound, impossible figures),
``peers`` (the implementations compared), ``scenarios`` (dense, overhead,
many, torch, sparse, torch-sparse, isa, threshold), ``worker`` (one ISA
module's timings), ``report`` (terminal table, JSON, Markdown, plots),
``cli`` (modes and filters); ``convergence`` (does it train: a small
language model on real text per optimizer config, ``python -m
fastadam.bench.convergence``).
"""
__version__ = "0.1.0"
