"""experiments/draft_layer_probe.py on a tiny checkpoint: an untrained draft layer is a copy of layer s+1, so the
adapter must agree with the last layer exactly as often as exit s+1 does (wrong masking or rotary positions would
break that); a few training steps run end to end, write the JSON and save the layer; a
draft that leaves no layers to verify is a one-line usage error."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_experiment


def test_untrained_draft_layer_is_exit_s_plus_1(tiny_checkpoint, tmp_path):
    probe = load_experiment("draft_layer_probe")
    args = ["--model", str(tiny_checkpoint), "--shared", "2", "--rows", "3", "--eval_prompts", "3",
            "--max_new_tokens", "12"]
    out = probe.main(args + ["--steps", "0", "--out", str(tmp_path / "untrained.json")])
    agreement = out["agreement"]
    assert out["positions"] > 0
    adapter, exit3 = agreement["adapter_2+1"], agreement["exit_3"]
    for key in ("top1", "draft", "accepted_by_draft_length"):
        assert adapter[key] == exit3[key], key
    assert adapter["best_speedup"] > 0
    assert agreement["exit_6"]["top1"] == 1.0

    trained = probe.main(args + ["--steps", "3", "--batch", "2", "--lr", "1e-2", "--out", str(tmp_path / "t.json"),
                                 "--save", str(tmp_path / "draft.safetensors")])
    assert json.loads((tmp_path / "t.json").read_text()) == trained
    assert trained["final_kl"] > 0
    assert set(trained["agreement"]) == {"exit_2", "exit_3", "exit_6", "adapter_2+1"}
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "draft.safetensors")
    assert any(k.startswith("layers.0.") for k in saved) and "norm.weight" in saved


def test_draft_layers_must_leave_a_verifier(tiny_checkpoint, tmp_path, capsys):
    probe = load_experiment("draft_layer_probe")
    with pytest.raises(SystemExit) as e:
        probe.main(["--model", str(tiny_checkpoint), "--shared", "5", "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert "must leave layers for the verifier" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
