"""Integration: every task on the default model (SmolLM2-135M, 30 layers), two exits, a couple of prompts."""

import json

import pytest

from sortedllm.cli import main


@pytest.mark.slow
@pytest.mark.timeout(600)  # generation on the 30-layer model for four tasks
def test_default_model_every_task(tmp_path, capsys):
    out = tmp_path / "ev"
    code = main(["evaluate", "--model", "smollm2-135m", "--tasks", "loss,gsm8k,triviaqa,tournament,similarity",
                 "--exits", "9,30", "--limit", "2", "--max_new_tokens", "12", "--positions", "4",
                 "--output_dir", str(out), "--no_progress"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["models"]["A"]["exits"] == [9, 30] and res["models"]["A"]["mode"] == "untuned"
    loss = res["tasks"]["loss"]["A"]
    assert loss["9"]["loss"] > loss["30"]["loss"]  # an untuned intermediate exit is far off the last layer
    sim = res["tasks"]["similarity"]["A"]
    assert sim["30"]["kl"] == pytest.approx(0, abs=1e-5) and sim["30"]["top1_agreement"] == 1.0
    assert sim["9"]["kl"] > 1.0 and sim["9"]["cosine"] < sim["30"]["cosine"]
    assert len(sim["9"]["kl_by_position"]) == 4
    match = res["details"]["tournament"]["matches"][0]
    assert match["a"] == ["A", 9] and match["b"] == ["A", 30] and match["wins"] + match["losses"] + match["ties"] == 2
    for task in ("gsm8k", "triviaqa"):
        assert set(res["tasks"][task]["A"]) == {"9", "30"}
    assert (out / "report.md").is_file() and (out / "similarity_kl.png").is_file()
