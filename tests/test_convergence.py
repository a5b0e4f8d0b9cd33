"""The convergence harness (fastadam.bench.convergence), short: it trains, and
fastadam's float32 AdamW follows torch's fused AdamW bit for bit on a real model
(the same batches, the same initial weights, an lr schedule, weight decay)."""
import math

import pytest

torch = pytest.importorskip("torch")

from fastadam.bench import convergence as cv  # noqa: E402

SHORT = cv.short_shape(steps=30)


@pytest.fixture(scope="module")
def data():
    return cv.Data(SHORT)


@pytest.fixture(scope="module")
def anchor(data):
    return cv.train("torch-fused", SHORT, data)


def test_corpus_is_real_text(data):
    text = cv.corpus()
    assert len(text) > 100_000 and "statement" in text
    assert 50 < data.vocab < 256
    assert len(data.held_out) < len(data.train)


def test_fastadam_float32_follows_torch_fused_bitwise(data, anchor):
    rec = cv.train("float32", SHORT, data)
    assert rec["train_loss"] == anchor["train_loss"]
    assert rec["eval_loss"] == anchor["eval_loss"]


def test_it_trains(anchor, data):
    # from ~ln(vocab) at initialisation to clearly below it in 30 steps
    assert anchor["eval_loss"][0] > 0.9 * math.log(data.vocab)
    assert anchor["final_eval_loss"] < 0.8 * anchor["eval_loss"][0]


def test_cli_writes_json(tmp_path):
    out = tmp_path / "c"
    assert cv.main(["--configs", "float32", "--steps", "3", "--d-model", "16", "--layers", "1",
                    "--seq", "16", "--batch", "2", "--out", str(out)]) == 0
    import json

    res = json.loads((tmp_path / "c.json").read_text())
    assert list(res["results"]) == ["float32"] and len(res["results"]["float32"]["train_loss"]) == 3


def test_cli_rejects_unknown_config():
    with pytest.raises(SystemExit):
        cv.main(["--configs", "nope"])
