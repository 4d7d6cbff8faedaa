"""experiments/make_results.py on results.json files written by real `sortedllm evaluate` runs of tiny checkpoints:
tables and verdicts come from the numbers (change one, the report changes), every verdict states its sample and,
where the JSON allows, a 95% interval that can turn a win into "no difference", missing files name their command,
the output is deterministic, and the commands it cites are the ones that ran."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from statistics import median

import pytest

from tests.conftest import load_experiment, make_tiny

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


mr = load_experiment("make_results")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_checkpoint, tokenizer):
    """Real evaluations of tiny checkpoints (exits 2, 4, 6) laid out as experiments/paper.sh lays them out.
    Returns (results folder, {experiment: evaluate argv})."""
    from sortedllm import SortedModel
    from sortedllm.cli import main

    root = tmp_path_factory.mktemp("make_results")
    ck = {}
    for seed, (name, mode) in enumerate((("soft", "soft"), ("sft", "sft")), start=1):
        sm = SortedModel(make_tiny("llama", tokenizer, seed=seed), tokenizer, exits=[2, 4, 6])
        sm.config.mode = mode
        sm.save_pretrained(root / name)
        ck[name] = str(root / name)
    from sortedllm.adapters.draft_layer import DraftLayer

    # untrained over the full vocabulary: it drafts exactly as exit 2
    draft = DraftLayer.from_model(SortedModel.from_pretrained(ck["soft"]), shared=1, layers=1, vocab=None)
    draft = draft.save_pretrained(root / "draft-layer") / "draft_layer.safetensors"
    results = root / "results"
    runs = {
        "quick-loss": ["--model", ck["soft"], "--compare", f"{ck['sft']},{tiny_checkpoint}", "--names",
                       "soft,sft,sft-ict", "--tasks", "loss", "--limit", "3"],
        "quick-gsm8k": ["--model", ck["soft"], "--compare", ck["sft"], "--names", "soft,sft", "--tasks", "gsm8k",
                        "--limit", "2", "--max_new_tokens", "4"],
        "quick-tournament": ["--model", ck["soft"], "--compare", ck["sft"], "--names", "soft,sft", "--tasks",
                             "tournament", "--limit", "2", "--max_new_tokens", "4", "--pairs", "cross"],
        "quick-vs-last": ["--model", ck["soft"], "--names", "soft", "--tasks", "tournament", "--limit", "2",
                          "--max_new_tokens", "4", "--pairs", "last"],
        "quick-similarity": ["--model", ck["soft"], "--compare", f"{ck['sft']},{tiny_checkpoint}", "--names",
                             "soft,sft,untuned", "--tasks", "similarity", "--limit", "2", "--positions", "3"],
        "draft-quality-40": ["--model", ck["sft"], "--compare", ck["soft"], "--names", "soft-distill,soft",
                             "--tasks", "loss", "--limit", "2"],
        "early-exit-oracle-gsm8k": ["--model", ck["soft"], "--names", "draft-quality", "--tasks", "agreement",
                                    "--data_file", "agreement=gsm8k:test", "--limit", "2", "--max_new_tokens", "4"],
        "draft-layer-tiny": ["--model", ck["soft"], "--names", "draft-quality", "--tasks", "agreement", "--limit", "2",
                             "--max_new_tokens", "4", "--draft_layer", str(draft)],
    }
    for name, argv in runs.items():
        assert main(["evaluate", *argv, "--output_dir", str(results / name), "--no_progress"]) == 0
    return results, runs


def render(results: Path, bench: Path, out: Path) -> str:
    assert mr.main(["--results", str(results), "--benchmarks", str(bench), "--configs", str(ROOT),
                    "--out", str(out)]) == 0
    return (out / "results.md").read_text()


def verdict(md: str, claim: str) -> list[str]:
    """The verdict row of `claim`: [claim, answer, numbers, sample and interval, paper, vs paper]."""
    row = next(line for line in md.splitlines() if line.startswith(f"| {claim} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def verdict_rows(md: str) -> list[list[str]]:
    table = md.split("## Verdict")[1].split("\n\nSummary:")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # after the header
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


def shift_loss(entry: dict, ref: dict, delta: float):
    """Make an exit's loss entry `ref`'s plus `delta` per token on every held-out row (same rows, same tokens)."""
    entry.update(loss=ref["loss"] + delta, row_loss=[r + delta * t for r, t in zip(ref["row_loss"], ref["row_tokens"])])


def set_accuracy(path: Path, counts: dict, n: int = 60):
    """Rewrite a gsm8k results.json: counts = {model: {exit: correct answers out of n}}."""
    res = json.loads(path.read_text())
    for model, by_exit in res["tasks"]["gsm8k"].items():
        for k, entry in by_exit.items():
            entry["n"], entry["accuracy"] = n, counts[model].get(k, 0) / n
    path.write_text(json.dumps(res))


def test_report_from_real_evaluations(evaluated, tmp_path):
    results, runs = evaluated
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("train.json", "decode.json"):  # the benchmarks' real JSON, when the repo has it
        if (ROOT / "benchmarks" / "results" / name).exists():
            shutil.copy(ROOT / "benchmarks" / "results" / name, bench / name)
    md = render(results, bench, tmp_path / "docs")
    assert render(results, bench, tmp_path / "docs2") == md  # deterministic

    # Per-exit loss table: the JSON's numbers, the best of each row in bold.
    loss = json.loads((results / "quick-loss" / "results.json").read_text())["tasks"]["loss"]
    for k in ("2", "4", "6"):
        vals = [loss[n][k]["loss"] for n in ("soft", "sft", "sft-ict")]
        cells = [f"**{v:.3f}**" if v == min(vals) else f"{v:.3f}" for v in vals]
        assert f"| {k} | {' | '.join(cells)} |" in md

    # The verdict is computed from those numbers: an exit counts only when the paired interval over held-out rows
    # excludes zero.
    sides = [mr.side(*mr.loss_interval(loss["soft"][k], loss["sft"][k]), False) for k in ("2", "4")]
    better, worse = sides.count("better"), sides.count("worse")
    row = verdict(md, "SoFT beats SFT at every intermediate exit on held-out loss")
    assert row[1] == ("yes" if better == 2 else "no difference" if better == worse == 0 else "no")
    assert row[2].startswith(f"better at {better} of 2 exits, worse at {worse}")
    tokens = loss["soft"]["2"]["tokens"]
    rows_n = loss["soft"]["2"]["rows"]
    assert row[3] == f"{rows_n} held-out rows ({tokens:,} tokens) per exit; paired bootstrap 95% interval over rows " \
                     f"of each difference"
    data = json.loads((results / "quick-loss" / "results.json").read_text())["details"]["loss"]["data"]
    assert f"Held-out data: `{data}`, {tokens:,} tokens per exit." in md

    # Every verdict states its sample size.
    rows = verdict_rows(md)
    assert len(rows) >= 10 and all(len(r) == 6 and any(ch.isdigit() for ch in r[3]) for r in rows), rows

    # GSM8K accuracy: questions per exit (read from each exit's entry), and the verdict's Newcombe intervals.
    acc = json.loads((results / "quick-gsm8k" / "results.json").read_text())["tasks"]["gsm8k"]
    assert f"\n{acc['soft']['2']['n']} questions per exit.\n" in md
    row = verdict(md, "SoFT beats SFT at every intermediate exit on GSM8K accuracy")
    assert row[3].startswith(f"{acc['soft']['2']['n']} questions per exit and model; Newcombe 95% interval")

    # Each table cites the command that made it, rebuilt from results.json: it is the command that ran.
    for name, argv in runs.items():  # (the oracle's is cited after the script that runs it, once per task)
        lead = "which runs " if name.startswith("early-exit-oracle") else \
            "Commands: " if name.startswith("draft-layer") else "Command: "
        assert f"{lead}`sortedllm evaluate {' '.join(argv)} --output_dir {results}/{name}`" in md

    # Missing results: the section names the command, nothing crashes.
    assert "`" + f"{results}/quick-triviaqa/results.json` is missing. Run `bash experiments/paper.sh eval quick`" in md
    assert "*Longer budget (GSM8K, 250 steps): not run yet (`bash experiments/paper.sh all gsm8k`).*" in md

    # Similarity: KL / cosine / top-1 per exit per model, and its verdict from the numbers.
    sim = json.loads((results / "quick-similarity" / "results.json").read_text())["tasks"]["similarity"]
    kl = [f"{sim[n]['2']['kl']:.3f}" for n in ("soft", "sft", "untuned")]
    assert any(line.startswith(f"| 2 | {' | '.join(kl)} |") for line in md.splitlines())
    row = verdict(md, "SoFT beats SFT at every intermediate exit on KL to the last layer (lower)")
    assert row[1] == ("yes" if all(sim["soft"][k]["kl"] < sim["sft"][k]["kl"] for k in ("2", "4")) else "no")

    # Tournament and the draft-quality section (generic per-exit table of any task).
    assert "| exit | SoFT k vs SFT k: W/L/T | (W-L)/n |" in md and "**Every SoFT exit against" in md
    assert "| exit | SoFT+distill loss | SoFT loss |" in md

    # The early-exit ceiling: the oracle's numbers per task, its verdict from them; tasks not measured are left out.
    oracle = json.loads((results / "early-exit-oracle-gsm8k" / "results.json").read_text())
    rows = oracle["details"]["agreement"]["oracle_early_exit"]["draft-quality"]
    cells = " | ".join(f"exit {r['mean_exit']:.1f}, {r['speedup']:.2f}x" for r in rows)
    exits = oracle["tasks"]["agreement"]["draft-quality"]
    best = max((m["best_speedup"], k, m["best_draft_length"]) for k, m in exits.items() if m["best_speedup"])
    cells += f" | {exits['2']['top1_agreement']:.3f} | {best[0]:.2f}x (exit {best[1]}, g = {best[2]}) |"
    section = md.split("### Early-exit ceiling")[1].split("## 5.")[0]
    assert f"| GSM8K | 2 x <= 4 | {cells}" in section and "| TriviaQA |" not in section
    row = verdict(md, "Early-exit ceiling (oracle, 95% token agreement) reaches the 1.5x speed target on every task")
    assert row[1] == ("yes" if rows[1]["speedup"] >= 1.5 else "no") and row[2] == f"GSM8K: {rows[1]['speedup']:.2f}x"
    positions = exits["2"]["positions"]
    assert row[3].startswith(f"GSM8K 2 prompts ({positions:,} positions); no 95% interval")

    # Benchmarks beside the paper, when their JSON exists.
    if (bench / "decode.json").exists():
        assert "| method (ours) | paper row | PandaLM ours | PandaLM paper |" in md and "1.41x, reject 0.43" in md
    if (bench / "train.json").exists():
        assert verdict(md, "SoFT (paper's loss) peak memory vs SFT")[4] == "~1.25x"

    # Every plot the report shows exists and is a PNG.
    images = [line[line.index("(") + 1:-1] for line in md.splitlines() if line.startswith("![")]
    assert len(images) >= 7
    for name in images:
        assert (tmp_path / "docs" / name).read_bytes().startswith(PNG)


def test_changing_a_number_changes_table_and_verdict(evaluated, tmp_path):
    src, _ = evaluated
    results = tmp_path / "results"
    shutil.copytree(src, results)
    bench = tmp_path / "no-bench"  # benchmarks missing: their sections name the commands
    bench.mkdir()
    path = results / "quick-loss" / "results.json"
    res = json.loads(path.read_text())
    loss = res["tasks"]["loss"]
    for k in ("2", "4"):  # SoFT now clearly better than SFT at both intermediate exits
        shift_loss(loss["soft"][k], loss["sft"][k], -0.5)
    path.write_text(json.dumps(res))
    md = render(results, bench, tmp_path / "a")
    assert verdict(md, "SoFT beats SFT at every intermediate exit on held-out loss")[1:2] == ["yes"]
    assert f"**{loss['soft']['2']['loss']:.3f}**" in md

    for k in ("2", "4"):  # ...and now clearly worse
        shift_loss(loss["soft"][k], loss["sft"][k], 0.5)
    path.write_text(json.dumps(res))
    md2 = render(results, bench, tmp_path / "b")
    row = verdict(md2, "SoFT beats SFT at every intermediate exit on held-out loss")
    assert row[1] == "no" and row[2].startswith("better at 0 of 2 exits, worse at 2")
    assert row[5] == "does not reproduce"
    assert f"{loss['soft']['4']['loss']:.3f}" in md2 and md2 != md

    assert "Run `python benchmarks/bench_decode.py --threads 1`" in md2
    assert "Run `python benchmarks/bench_train.py`" in md2


def test_training_commands_are_the_ones_paper_sh_runs():
    script = (ROOT / "experiments" / "paper.sh").read_text()
    for name, (config, extra) in mr.QUICK_TRAIN.items():
        assert f"--config {' '.join([config] + extra)}" in script, name


def test_longest_equal_steps_draft_comparison_gives_the_verdict(evaluated, tmp_path):
    src, _ = evaluated
    results = tmp_path / "results"
    shutil.copytree(src, results)
    longer = results / "draft-quality-equal-225"
    shutil.copytree(results / "draft-quality-40", longer)
    path = longer / "results.json"
    res = json.loads(path.read_text())
    loss = res["tasks"]["loss"]
    for k in ("2", "4"):  # at 225 steps the distilled model wins at both intermediate exits; at 40 it need not
        shift_loss(loss["soft-distill"][k], loss["soft"][k], -0.25)
    path.write_text(json.dumps(res))
    md = render(results, tmp_path / "no-bench", tmp_path / "docs")
    assert "### 40 steps each" in md and "### 225 steps each" in md
    assert md.index("### 40 steps each") < md.index("### 225 steps each")
    assert "\n\n\n" not in md  # one blank line between blocks, as a hand-written page
    assert f"{loss['soft-distill']['2']['loss']:.3f}" in md
    claim = "SoFT+distill beats SoFT at every intermediate exit on loss"
    assert sum(line.startswith(f"| {claim} |") for line in md.splitlines()) == 1  # one verdict, the longest run's
    assert verdict(md, claim)[1] == "yes"
    assert (tmp_path / "docs" / "results" / "draft_225_loss.png").read_bytes().startswith(PNG)


def test_a_budget_shows_only_the_experiments_it_runs(evaluated, tmp_path):
    src, _ = evaluated
    results = tmp_path / "results"
    shutil.copytree(src, results)
    md = render(results, tmp_path / "no-bench", tmp_path / "a")
    assert "*Longer budget (Alpaca, 250 steps): not run yet (`bash experiments/paper.sh all alpaca`).*" in md
    assert "*Longer budget (TriviaQA, 250 steps): not run yet (`bash experiments/paper.sh all triviaqa`).*" in md
    shutil.copytree(results / "quick-loss", results / "alpaca-loss")  # Alpaca tuning is judged by loss, not GSM8K
    md = render(results, tmp_path / "no-bench", tmp_path / "b")
    alpaca = md[md.index("## Longer budget (Alpaca, 250 steps)"):md.index("## Quickstart budget")]
    assert "**Held-out loss" in alpaca and "GSM8K accuracy" not in alpaca and "TriviaQA exact match" not in alpaca
    assert "### 1. SoFT vs SFT vs SFT+ICT at every exit" in alpaca
    res = json.loads((results / "alpaca-loss" / "results.json").read_text())  # SFT+ICT not evaluated (yet)
    del res["models"]["sft-ict"], res["tasks"]["loss"]["sft-ict"]
    loss = res["tasks"]["loss"]
    for k in ("2", "4"):  # SoFT worse than SFT at both intermediate exits: the Alpaca verdict must say no
        shift_loss(loss["soft"][k], loss["sft"][k], 0.5)
    (results / "alpaca-loss" / "results.json").write_text(json.dumps(res))
    md = render(results, tmp_path / "no-bench", tmp_path / "c")
    alpaca = md[md.index("## Longer budget (Alpaca, 250 steps)"):md.index("## Quickstart budget")]
    assert "### 1. SoFT vs SFT at every exit" in alpaca and "| exit | SoFT | SFT |\n" in alpaca
    assert "experiments/configs/paper-alpaca.yaml --mode soft --output_dir runs/paper/alpaca-soft" in alpaca
    row = verdict(md, "(alpaca) SoFT beats SFT at every intermediate exit on held-out loss")
    assert row[1] == "no" and row[2].startswith("better at 0 of 2 exits, worse at 2")
    assert row[5] == "does not reproduce"
    assert verdict(md, "(quick) SoFT beats SFT at every intermediate exit on held-out loss")  # both budgets, apart


def test_oracle_section_without_a_draft_exit(evaluated, tmp_path):
    """An agreement run that measured only the last exit has no self-speculation price: the cell says "-"."""
    src, _ = evaluated
    results = tmp_path / "results"
    shutil.copytree(src, results)
    path = results / "early-exit-oracle-gsm8k" / "results.json"
    res = json.loads(path.read_text())
    per_exit = res["tasks"]["agreement"]["draft-quality"]
    last = max(per_exit, key=int)
    res["tasks"]["agreement"]["draft-quality"] = {last: per_exit[last]}
    path.write_text(json.dumps(res))
    md = render(results, tmp_path / "no-bench", tmp_path / "docs")
    row = next(line for line in md.split("### Early-exit ceiling")[1].splitlines() if line.startswith("| GSM8K |"))
    assert row.endswith("| 1.000 | - |")


def test_draft_layer_section(evaluated, tmp_path):
    """The draft layer's row: its agreement beside its exit's own (equal here: the untrained draft is exit 2), and
    the verdict computed from it."""
    results, _ = evaluated
    md = render(results, tmp_path / "no-bench", tmp_path / "docs")
    res = json.loads((results / "draft-layer-tiny" / "results.json").read_text())
    d = res["details"]["agreement"]["draft_layer"]["draft-quality"]
    own = res["tasks"]["agreement"]["draft-quality"]["2"]["top1_agreement"]
    assert d["top1_agreement"] == own
    section = md.split("### A trained draft layer on the frozen recipe")[1]
    assert f"| draft-layer-tiny | 1 shared + 1 own | 2 | {own:.3f} | {own:.3f} |" in section
    row = verdict(md, "A draft branch at exit 2's cost agrees with the last layer on >= 65% of tokens")
    assert row[1] == ("yes" if own >= 0.65 else "no") and row[2].startswith(f"{own:.3f} (draft-layer-tiny)")


def test_accuracy_verdicts_count_only_differences_beyond_their_interval(evaluated, tmp_path):
    """A GSM8K difference counts as a win or a loss only when its Newcombe 95% interval excludes zero."""
    src, _ = evaluated
    results = tmp_path / "results"
    shutil.copytree(src, results)
    path = results / "quick-gsm8k" / "results.json"
    claim = "SoFT beats SFT at every intermediate exit on GSM8K accuracy"

    set_accuracy(path, {"soft": {"2": 30, "4": 30, "6": 30}, "sft": {"2": 3, "4": 3, "6": 30}})
    md = render(results, tmp_path / "no-bench", tmp_path / "a")
    assert "\n60 questions per exit.\n" in md
    lo, hi = mr.newcombe(30, 60, 3, 60)
    row = verdict(md, claim)
    assert row[1] == "yes" and row[5] == "reproduces"
    assert row[2] == (f"better at 2 of 2 exits, worse at 0, no difference at 0; 2: 50.0% vs 5.0% ({100 * lo:+.1f} to "
                      f"{100 * hi:+.1f}), 4: 50.0% vs 5.0% ({100 * lo:+.1f} to {100 * hi:+.1f})")
    assert row[3].startswith("60 questions per exit and model; Newcombe 95% interval of each difference")

    # 5% vs 3.3%: SoFT ahead on the point values, but the interval crosses zero: no difference, not a win.
    set_accuracy(path, {"soft": {"2": 3, "4": 3, "6": 30}, "sft": {"2": 2, "4": 2, "6": 30}})
    row = verdict(render(results, tmp_path / "no-bench", tmp_path / "b"), claim)
    assert row[1] == "no difference" and row[5] == "undecided (no difference at any exit)"
    assert row[2].startswith("better at 0 of 2 exits, worse at 0, no difference at 2")

    # A win at one exit and a loss at the other.
    set_accuracy(path, {"soft": {"2": 30, "4": 3, "6": 30}, "sft": {"2": 3, "4": 30, "6": 30}})
    row = verdict(render(results, tmp_path / "no-bench", tmp_path / "c"), claim)
    assert row[1] == "no" and row[2].startswith("better at 1 of 2 exits, worse at 1, no difference at 0")
    assert row[5] == "does not reproduce"


def test_intervals_match_published_values():
    """Wilson and Newcombe (method 10) against the worked examples of Newcombe, Stat. Med. 1998."""
    for (k, n), want in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                         (1, 29): (0.0061, 0.1718)}.items():
        assert [round(x, 4) for x in mr.wilson(k, n)] == list(want), (k, n)
    for args, want in {(56, 70, 48, 80): (0.0524, 0.3339), (9, 10, 3, 10): (0.1705, 0.8090),
                       (5, 56, 0, 29): (-0.0381, 0.1926), (0, 10, 0, 20): (-0.1611, 0.2775),
                       (10, 10, 0, 20): (0.6791, 1.0)}.items():
        assert [round(x, 4) for x in mr.newcombe(*args)] == list(want), args
    assert mr.side(0.01, 0.2, True) == "better" and mr.side(0.01, 0.2, False) == "worse"
    assert mr.side(-0.2, -0.01, True) == "worse" and mr.side(-0.2, 0.01, True) == "no difference"


def test_bootstrap_is_seeded_and_brackets_the_statistic():
    rows = [1.02, 0.97, 1.05, 0.99, 1.01, 0.96, 1.04, 1.00, 0.98, 1.03]
    lo, hi = mr.bootstrap(rows, median)
    assert (lo, hi) == mr.bootstrap(rows, median)  # the same rows give the same interval, run after run
    assert min(rows) <= lo < median(rows) < hi <= max(rows)
    def mean(xs):
        return sum(xs) / len(xs)

    few = dict(resamples=200)
    assert mr.bootstrap(rows, mean, seed=1, **few) != mr.bootstrap(rows, mean, seed=2, **few)  # the seed is used
    # Over 40 rows the percentile interval of a mean is close to the normal one, mean +- 1.96 standard errors.
    wide = [(i * 37) % 41 / 10 for i in range(40)]
    m, sd = mean(wide), (sum((x - mean(wide)) ** 2 for x in wide) / (len(wide) - 1)) ** 0.5
    lo_m, hi_m = mr.bootstrap(wide, mean)
    half = 1.96 * sd / len(wide) ** 0.5
    assert abs(lo_m - (m - half)) < 0.15 * half and abs(hi_m - (m + half)) < 0.15 * half
    assert mr.bootstrap([1.5] * 10, median) == (1.5, 1.5)


def train_rows(ratios: dict[str, list[float]]) -> list[dict]:
    """benchmarks/results/train.json rows: hf_sft's per-round CPU seconds and each method's ratio to it."""
    base = [2.0 + 0.1 * i for i in range(len(next(iter(ratios.values()))))]
    rows = []
    for method, rs in {"hf_sft": [1.0] * len(base), **ratios}.items():
        cpu = [b * r for b, r in zip(base, rs)]
        rows.append({"method": method, "model": "tiny", "batch_size": 2, "mean_seq_len": 100, "rounds": len(base),
                     "exits": [2, 4, 6], "cpu_s": cpu, "cpu_time_ratio": round(median(rs), 3),
                     "time_ratio": round(median(rs), 3), "peak_mem_ratio": 1.0, "ideal_ratio": 1.0,
                     "ideal_ratio_llama2_13b": 1.0})
    return rows


def test_training_cost_verdicts_use_the_per_round_interval(evaluated, tmp_path):
    results, _ = evaluated
    bench = tmp_path / "bench"
    bench.mkdir()
    wobble = [1.04, 0.97, 1.02, 0.96, 1.03, 0.98, 1.01, 0.99, 1.05, 0.95]  # around SFT's time
    ratios = {"soft_uniform": [1.5 * w for w in wobble], "soft_rotate": wobble,
              "soft_sample1": [0.8 * w for w in wobble]}
    (bench / "train.json").write_text(json.dumps(train_rows(ratios)))
    md = render(results, bench, tmp_path / "docs")
    for name, answer in (("soft_rotate", "no difference"), ("soft_sample1", "yes")):
        row = verdict(md, f"SoFT with one intermediate exit per step (`{name}`) is faster per step than SFT (CPU)")
        lo, hi = mr.bootstrap(ratios[name], median)
        assert row[1] == answer and f"({lo:.3f}x to {hi:.3f}x)" in row[2], row
        assert row[3] == "10 rounds; bootstrap 95% interval of the median per-round CPU ratio"
    row = verdict(md, "SoFT (paper's loss) step time is at most the paper's 0.98x SFT's (+5%), CPU time (the less "
                      "noisy measure on this shared machine)")
    assert row[1] == "no" and row[5] == "does not reproduce"

    rows = train_rows(ratios)  # per-round times missing: the point value decides and the sample says why
    for r in rows:
        del r["cpu_s"]
    (bench / "train.json").write_text(json.dumps(rows))
    row = verdict(render(results, bench, tmp_path / "docs2"),
                  "SoFT with one intermediate exit per step (`soft_rotate`) is faster per step than SFT (CPU)")
    assert row[1] == "no" and row[3] == "10 rounds; no 95% interval: train.json holds no per-round CPU times"


def test_committed_results_hold_no_machine_paths():
    """The JSON make_results reads names checkpoints and files relative to the repository, never one machine's."""
    files = sorted((ROOT / "experiments" / "results").glob("*/results.json"))
    files += sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files

    def strings(o):
        if isinstance(o, dict):
            for v in o.values():
                yield from strings(v)
        elif isinstance(o, list):
            for v in o:
                yield from strings(v)
        elif isinstance(o, str):
            yield o

    bad = [(f.relative_to(ROOT), s) for f in files for s in strings(json.loads(f.read_text()))
           if s.startswith(("/", "~")) or str(ROOT) in s]
    assert not bad, bad


def scaled(entry: dict, factor: float) -> dict:
    """An exit's loss entry with every held-out row's loss multiplied by `factor` (same rows, same tokens)."""
    rows = [x * factor for x in entry["row_loss"]]
    return {**entry, "row_loss": rows, "loss": sum(rows) / entry["tokens"],
            "ci95": [c * factor for c in entry["ci95"]]}


def test_ablation_section_judges_the_default_by_paired_intervals(evaluated, tmp_path):
    results, _ = evaluated
    base = json.loads((results / "quick-loss" / "results.json").read_text())
    sft = base["tasks"]["loss"]["sft"]
    assert all("row_loss" in e and e["rows"] >= 1 for e in sft.values())

    def write(last_factor: float, shallow_factor: float) -> str:
        uniform = {k: scaled(e, 2.0) for k, e in sft.items()}
        last = max(sft, key=int)
        w75 = {k: scaled(e, 2.0 * shallow_factor) for k, e in sft.items()}
        w75[last] = scaled(sft[last], last_factor)
        res = {**base, "tasks": {"loss": {"sft": sft, "uniform": uniform, "w75": w75}}}
        folder = tmp_path / "r" / "ablation-quick"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(res))
        return render(tmp_path / "r", tmp_path / "bench", tmp_path / f"out{last_factor}")

    (tmp_path / "bench").mkdir()
    md = write(1.0, 1.0)
    assert "## 7. SoFT loss ablation" in md and "bash experiments/soft_ablation.sh quick" in md
    assert "*GSM8K, 250 steps: not run yet (`bash experiments/soft_ablation.sh gsm8k`).*" in md
    row = verdict(md, "(quick) default SoFT's last exit is at most 1.02x SFT's held-out loss")
    assert row[1] == "yes" and row[2].startswith("1.000 [1.000, 1.000]") and "held-out rows" in row[3]
    assert verdict(md, "(quick) default SoFT's intermediate exits are at most 1.1x uniform SoFT's loss")[1] == "yes"
    md = write(1.5, 1.3)
    assert verdict(md, "(quick) default SoFT's last exit is at most 1.02x SFT's held-out loss")[1] == "no"
    assert verdict(md, "(quick) default SoFT's intermediate exits are at most 1.1x uniform SoFT's loss")[1] == "no"
