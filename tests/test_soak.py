"""A short soak (the ``soak`` bench scenario, scaled down): thousands of steps and
a hundred-odd optimizers (numpy and torch, dense, sparse and mixed) created and
destroyed; RSS and tracemalloc's traced size stay flat after warm-up."""
import pytest

from fastadam.bench import soak

pytest.importorskip("torch")   # imported before tracing starts (torch's import is large)


@pytest.mark.parametrize("name,steps,n,block", [("small", 1400, 256, 20),
                                                ("large", 28, 2**17, 2)])
def test_soak_memory_is_flat(name, steps, n, block):
    recs = soak.phase(name, steps, n, block)
    summary = recs[-1]
    assert summary["scenario"] == "soak-summary" and summary["steps"] == steps
    assert set(summary["kinds"]) >= {"fastadam.Adam", "fastadam.SparseAdam",
                                     "fastadam.torch.AdamW", "fastadam.torch.SparseAdam",
                                     "fastadam.torch.Adam(mixed)"}
    assert not summary["failed"], (
        f"{name}: RSS grew {summary['rss_growth_mib']} MiB (tolerance "
        f"{summary['rss_tol_mib']}), traced {summary['traced_growth_kib']:.1f} KiB "
        f"(tolerance {summary['traced_tol_kib']}) after warm-up")


def test_soak_flags_a_leak():
    """The check bites: a kind that keeps a reference to every optimizer it builds."""
    kept = []
    base = soak.kinds(with_torch=False)["fastadam.Adam"]

    def leaky(n, rng, prev):
        step, opt = base(n, rng, prev)
        kept.append(opt)
        return step, opt
    orig = soak.kinds
    soak.kinds = lambda with_torch=None: {"leaky": leaky}
    try:
        summary = soak.phase("small", 200, 4096, 4)[-1]
    finally:
        soak.kinds = orig
    assert summary["failed"] and summary["traced_growth_kib"] > summary["traced_tol_kib"]
