#!/usr/bin/env bash
# Reproduce the Sorted LLaMA paper's findings in miniature on the default model.
#
#   bash experiments/paper.sh train quick      # the quickstart budget: SoFT, SFT, SFT+ICT, SoFT+ICT, SoFT+LoRA,
#                                              # SoFT+distill, 40 steps each on the same 160 GSM8K rows
#   bash experiments/paper.sh eval quick       # -> experiments/results/quick-*/ and draft-quality-40/results.json
#   bash experiments/paper.sh train gsm8k      # longer budget (250 steps): SoFT, SFT, SFT+ICT; resumable (ICT restarts)
#   bash experiments/paper.sh eval gsm8k       # per-exit evaluations -> experiments/results/gsm8k-*/results.json
#   bash experiments/paper.sh all gsm8k        # both
#   bash experiments/paper.sh report           # docs/results.md + docs/results/*.png from the JSON files
# Stages: quick, gsm8k, alpaca, triviaqa. Every step is skipped when its output exists. Checkpoints go to runs/
# (quick) and runs/paper/ (longer budgets), not committed; every number in docs/results.md comes from a
# results.json written by this script (or by benchmarks/, see the report). The folders it writes are listed in
# experiments/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

USAGE="usage: $0 train|eval|all <quick|gsm8k|alpaca|triviaqa> | report"
fail() { echo "error: $1" >&2; exit 2; }
case ${1:-} in
train | eval | all)
    case ${2:-} in
    quick | gsm8k | alpaca | triviaqa) ;;
    "") fail "'$1' needs a stage; $USAGE" ;;
    *) fail "unknown stage '$2'; $USAGE" ;;
    esac ;;
report) ;;
"") fail "no command given; $USAGE" ;;
*) fail "unknown command '$1'; $USAGE" ;;
esac
[ -f .venv/bin/activate ] || fail "no .venv here: run 'bash scripts/setup.sh' first"
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per job: two jobs share the 2 cores without thrashing
RUNS=${RUNS:-runs/paper}
OUT=experiments/results
LIMIT=${LIMIT:-60}           # prompts per generation task (60 fits the CPU budget of one session)

train() {  # train <task> <mode> : SoFT / SFT on the task's paper config, resumable
    local task=$1 mode=$2 dir="$RUNS/$1-$2"
    [ -f "$dir/final/sorted_config.json" ] && { echo "have $dir/final"; return; }
    sortedllm train --config "experiments/configs/paper-$task.yaml" --mode "$mode" --output_dir "$dir" \
        --resume auto
}

train_ict() {  # SFT+ICT: heads per exit on the frozen SFT model, on the same rows cut at the same length as SoFT/SFT
    local task=$1 dir="$RUNS/$1-sft-ict" len
    [ -f "$dir/final/sorted_config.json" ] && { echo "have $dir/final"; return; }
    len=$(sed -n 's/^max_length: *//p' "experiments/configs/paper-$task.yaml")
    sortedllm train --config experiments/configs/paper-ict.yaml --data "$task" --base "$RUNS/$task-sft/final" \
        --max_length "$len" --output_dir "$dir"   # ICT trains heads only, one short epoch: no --resume
}

evaluate() {  # evaluate <name> <args...> : skipped when its results.json exists
    local name=$1; shift
    [ -f "$OUT/$name/results.json" ] && { echo "have $OUT/$name"; return; }
    sortedllm evaluate "$@" --output_dir "$OUT/$name"
}

train_task() {
    local task=$1
    train "$task" soft & local soft=$!   # SoFT and SFT side by side, one core each
    train "$task" sft
    wait "$soft"
    train_ict "$task"
}

eval_task() {
    local task=$1 soft="$RUNS/$1-soft/final" sft="$RUNS/$1-sft/final"
    case $task in
    gsm8k)
        evaluate gsm8k-accuracy --model "$soft" --compare "$sft,$RUNS/gsm8k-sft-ict/final" --names soft,sft,sft-ict \
            --tasks loss,gsm8k --limit "$LIMIT" --max_new_tokens 200
        evaluate gsm8k-triviaqa --model "$soft" --compare "$sft" --names soft,sft --tasks triviaqa --limit "$LIMIT"
        ;;
    alpaca)
        evaluate alpaca-loss --model "$soft" --compare "$sft,$RUNS/alpaca-sft-ict/final" --names soft,sft,sft-ict \
            --tasks loss --limit 200
        ;;
    triviaqa)
        evaluate triviaqa-accuracy --model "$soft" --compare "$sft,$RUNS/triviaqa-sft-ict/final" \
            --names soft,sft,sft-ict --tasks loss,triviaqa --limit "$LIMIT"
        ;;
    esac
    # The paper's tournaments (PandaLM prompts, offline judge): SoFT exit k vs SFT exit k (both orders), and every
    # SoFT exit vs SoFT's own last layer.
    evaluate "$task-tournament" --model "$soft" --compare "$sft" --names soft,sft --tasks tournament \
        --pairs cross --limit 50
    evaluate "$task-vs-last" --model "$soft" --names soft --tasks tournament --pairs last --limit 50
    # The paper's analysis: KL and cosine of every exit to the last layer over generated positions 0..19.
    evaluate "$task-similarity" --model "$soft" --compare "$sft,smollm2-135m" --names soft,sft,untuned \
        --tasks similarity
}

# The quickstart budget (what docs/results.md reports first): every method the same 160 GSM8K rows, 40 optimizer
# steps of batch 4 (configs/quickstart.yaml; ICT trains heads for the same 40 steps on a frozen base).
quick_train() {  # quick_train <dir> <args...> : one quick-budget training, skipped when <dir>/final exists
    local dir=$1; shift
    [ -f "$dir/final/sorted_config.json" ] && { echo "have $dir/final"; return; }
    sortedllm train "$@"
}

train_quick() {
    # The paper's SoFT (uniform weights, lr 1e-4), not the quickstart's default loss (docs/results.md 7 compares them).
    quick_train runs/quickstart --config configs/quickstart.yaml --exit_schedule uniform --learning_rate 1.0e-4 &
    local soft=$!
    quick_train runs/sft --config configs/quickstart.yaml --mode sft --learning_rate 1.0e-4 --output_dir runs/sft
    wait "$soft"
    quick_train runs/ict --config configs/ict.yaml --base runs/sft/final &
    local ict=$!
    quick_train runs/soft-ict --config configs/ict.yaml --base runs/quickstart/final --output_dir runs/soft-ict
    wait "$ict"
    quick_train runs/lora --config configs/lora.yaml &
    local lora=$!
    quick_train runs/distill40 --config configs/quickstart.yaml --exit_schedule uniform --learning_rate 1.0e-4 --distill_alpha 0.8 --output_dir runs/distill40
    wait "$lora"
}

eval_quick() {
    local soft=runs/quickstart/final sft=runs/sft/final ict=runs/ict/final
    evaluate quick-loss --model "$soft" --compare "$sft,$ict,runs/soft-ict/final,runs/lora/final" \
        --names soft,sft,sft-ict,soft-ict,soft-lora --tasks loss --limit 200
    evaluate quick-gsm8k --model "$soft" --compare "$sft,$ict" --names soft,sft,sft-ict --tasks gsm8k --limit 40 \
        --max_new_tokens 160
    evaluate quick-triviaqa --model "$soft" --compare "$sft,$ict" --names soft,sft,sft-ict --tasks triviaqa --limit 60
    evaluate quick-tournament --model "$soft" --compare "$sft" --names soft,sft --tasks tournament --pairs cross \
        --limit 30
    evaluate quick-vs-last --model "$soft" --names soft --tasks tournament --pairs last --limit 30
    evaluate quick-similarity --model "$soft" --compare "$sft,smollm2-135m" --names soft,sft,untuned \
        --tasks similarity
    # Draft quality at equal steps: SoFT + self-distillation vs SoFT (also draft_quality.sh equal40).
    evaluate draft-quality-40 --model runs/distill40/final --compare "$soft" --names soft-distill,soft \
        --tasks loss,agreement --limit 30
}

case $1 in  # checked at the top
train) if [ "$2" = quick ]; then train_quick; else train_task "$2"; fi ;;
eval) if [ "$2" = quick ]; then eval_quick; else eval_task "$2"; fi ;;
all) if [ "$2" = quick ]; then train_quick; eval_quick; else train_task "$2"; eval_task "$2"; fi ;;
report) python experiments/make_results.py ;;
esac
