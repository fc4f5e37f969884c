"""BERT through train.py: resuming is bit-exact at data degree 2 with dropout on (the masked-LM samples are
addressed by position, the masked count is summed over the data ranks), MLM / SOP terms are logged, and the
checkpoint loads as the BERT model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtlm import load_model
from mtlm.api import MaskedLanguageModel
from tests.test_resume import assert_identical, losses, train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
BERT = ["model=bert_tiny", "parallel.data=2", "trainer.max_steps=8", "checkpoint.interval=4",
        "trainer.eval_interval=4", "trainer.eval_iters=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_bert_resume_is_bit_exact(tmp_path: Path, cache: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    train(straight, cache, "run", *BERT, f"checkpoint.dir={straight / 'ck'}")
    proc = train(resumed, cache, "run", *BERT, f"checkpoint.dir={resumed / 'ck'}",
                 f"checkpoint.resume={straight / 'ck' / 'step_00000004'}")
    assert "at step 4" in proc.stdout
    want, got = losses(straight / "run"), losses(resumed / "run")
    assert sorted(got) == [5, 6, 7, 8] and got == {s: want[s] for s in range(5, 9)}
    assert_identical(straight / "ck" / "step_00000008", resumed / "ck" / "step_00000008")
    rows = [json.loads(line) for line in (straight / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["loss"] == pytest.approx(last["mlm_loss"] + last["sop_loss"], rel=1e-5)
    assert 0 <= last["sop_acc"] <= 1 and last["val_loss"] == pytest.approx(last["val_mlm_loss"] + last["val_sop_loss"])
    model = load_model(straight / "ck")
    assert isinstance(model, MaskedLanguageModel)
    mlm, sop = model(torch.zeros(1, 8, dtype=torch.long))
    assert mlm.shape == (1, 8, 512) and sop.shape == (1, 2)
