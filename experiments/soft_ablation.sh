#!/usr/bin/env bash
# Which SoFT loss costs the full model least? Every variant on the same rows and steps, beside SFT, with every exit's
# held-out loss and its 95% bootstrap interval over held-out rows (sortedllm evaluate --tasks loss).
#
#   bash experiments/soft_ablation.sh quick     # the quickstart budget: 40 steps on 160 GSM8K rows (~10 min a run)
#   bash experiments/soft_ablation.sh gsm8k     # the 250-step GSM8K budget (experiments/configs/paper-gsm8k.yaml)
#   bash experiments/soft_ablation.sh alpaca    # the winner confirmed on Alpaca (paper-alpaca.yaml)
#   bash experiments/soft_ablation.sh quick train|eval   # one half only (e.g. trainings side by side: VARIANTS=split)
#
# Variants (each one flag set on top of the budget's config):
#   sft      --mode sft                                     the baseline
#   uniform  --exit_optimizer joint                         the paper's loss: every exit weighted 1/8, one AdamW
#   split    --exit_optimizer split                         the same loss; the last exit's gradient and the other
#                                                           exits' gradients get their own Adam moments (train/split.py)
#   w75      last exit weight 0.75, lr 1.41e-4              one AdamW, the last exit given 3/4 of the loss, the rate
#                                                           raised so the other exits keep their step: SoFT's default
#                                                           (exit_schedule auto = last:0.75, configs/quickstart.yaml)
#   w75base  the same at the budget's own learning rate      (is it the weights or the learning rate?)
#   sft141   SFT at lr 1.41e-4                              (would SFT gain as much from the higher rate?)
#   w85, w90 last exit weighted 0.85 / 0.9, lr 1.41e-4       the trade-off curve between the last exit and the others
#   w90hi    last exit weighted 0.9, lr 2e-4                 (does a higher rate buy the others back again?)
#   w75kd    w75 with self-distillation (--distill_alpha 0.5) what distilling the last exit into the others does
# Output: experiments/results/ablation-<budget>/results.json (docs/results.md, "SoFT loss ablation").
# Checkpoints go to runs/ablation/<budget>-<variant>/ (not committed); a finished run or evaluation is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "error: $1" >&2; exit 2; }
case ${1:-} in
quick) CONFIG=configs/quickstart.yaml ;;
gsm8k | alpaca) CONFIG=experiments/configs/paper-$1.yaml ;;
"") fail "no budget given; usage: $0 quick|gsm8k|alpaca" ;;
*) fail "unknown budget '$1'; usage: $0 quick|gsm8k|alpaca" ;;
esac
BUDGET=$1
STAGE=${2:-all}
case $STAGE in train | eval | all) ;; *) fail "unknown stage '$STAGE': use train, eval or all" ;; esac
[ -f .venv/bin/activate ] || fail "no .venv here: run 'bash scripts/setup.sh' first"
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUNS=${RUNS:-runs/ablation}
VARIANTS=${VARIANTS:-sft uniform split w75}
LIMIT=${LIMIT:-200}   # held-out rows for the loss

flags() {
    case $1 in
    sft) echo "--mode sft" ;;
    uniform) echo "--exit_schedule uniform --exit_optimizer joint" ;;
    split) echo "--exit_schedule uniform --exit_optimizer split" ;;
    w75) echo "--exit_optimizer joint --exit_schedule weights --exit_weights 1,1,1,1,1,1,1,21 --learning_rate 1.41e-4" ;;
    w75base) echo "--exit_optimizer joint --exit_schedule weights --exit_weights 1,1,1,1,1,1,1,21" ;;
    sft141) echo "--mode sft --learning_rate 1.41e-4" ;;
    w85) echo "--exit_optimizer joint --exit_schedule last:0.85 --learning_rate 1.41e-4" ;;
    w90) echo "--exit_optimizer joint --exit_schedule last:0.9 --learning_rate 1.41e-4" ;;
    w90hi) echo "--exit_optimizer joint --exit_schedule last:0.9 --learning_rate 2.0e-4" ;;
    w75kd) echo "--exit_optimizer joint --exit_schedule last:0.75 --learning_rate 1.41e-4 --distill_alpha 0.5" ;;
    *) fail "unknown variant '$1'" ;;
    esac
}

for v in $VARIANTS; do
    [ "$STAGE" = eval ] && break
    dir=$RUNS/$BUDGET-$v
    if [ -f "$dir/final/sorted_config.json" ]; then echo "have $dir/final"; continue; fi
    resume=""; [ "$BUDGET" = quick ] || resume="--resume auto"
    # shellcheck disable=SC2046  # the flags are words on purpose
    sortedllm train --config "$CONFIG" $(flags "$v") --output_dir "$dir" $resume
done

[ "$STAGE" = train ] && exit 0
out=experiments/results/${NAME:-ablation-$BUDGET}   # NAME: another folder for extra variants
if [ -f "$out/results.json" ]; then echo "have $out"; exit 0; fi
set -- $VARIANTS
first=$1; shift
others=""; for v in "$@"; do others="$others${others:+,}$RUNS/$BUDGET-$v/final"; done
names=$(echo "$first $*" | tr ' ' ',')
sortedllm evaluate --model "$RUNS/$BUDGET-$first/final" --compare "$others" --names "$names" --tasks loss \
    --limit "$LIMIT" --output_dir "$out"
