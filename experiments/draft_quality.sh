#!/usr/bin/env bash
# Draft quality: SoFT + self-distillation so that shallow exits predict what the last layer predicts,
# measured by the `agreement` evaluation task (docs/draft-quality.md).
#
#   bash experiments/draft_quality.sh train      # experiments/configs/draft-quality.yaml -> runs/draft-quality/final
#                                                # (resumable)
#   bash experiments/draft_quality.sh eval       # loss + agreement vs SoFT -> experiments/results/draft-quality
#   bash experiments/draft_quality.sh equal40    # SoFT vs SoFT+distill at 40 steps each -> .../draft-quality-40
#   bash experiments/draft_quality.sh baseline   # optional: SoFT without distillation, same config and steps as train
#   bash experiments/draft_quality.sh step 225   # recipe vs baseline, both at checkpoint-225 -> .../draft-quality-equal-225
#   bash experiments/draft_quality.sh onpolicy   # 60 more steps from checkpoint-225, distilling on the model's own
#                                                # answers -> .../draft-quality-onpolicy
#   bash experiments/draft_quality.sh focus      # exit 9 alone: 300 more steps from the recipe on the model's own
#                                                # answers (after onpolicy) -> .../draft-quality-focus9
#   bash experiments/draft_quality.sh oracle     # early-exit ceiling of the recipe on GSM8K, TriviaQA and PandaLM
#                                                # prompts -> .../early-exit-oracle-<task> (docs/evaluation.md)
#   bash experiments/draft_quality.sh draftlayer # a trained draft layer on the frozen recipe, in place of layer 9
#                                                # (sortedllm train --mode draft) -> runs/draft-layer, .../draft-layer
#   bash experiments/draft_quality.sh all        # train, eval, equal40
#
# Every stage skips work that is done: a training run whose final/ exists, an evaluation whose results.json exists
# (delete it to measure again). An interrupted training run continues from its last checkpoint (--resume auto,
# a checkpoint every 25 steps), so `train` can be rerun session after session. Checkpoints live under runs/ (not
# committed); the numbers quoted in docs/draft-quality.md come from the results.json files written here, listed in
# experiments/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

USAGE="usage: $0 train|eval|equal40|baseline|step N|onpolicy|focus|oracle|draftlayer|all"
fail() { echo "error: $1" >&2; exit 2; }
case ${1:-} in
train | baseline | eval | equal40 | onpolicy | focus | oracle | draftlayer | all) ;;
step) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || fail "step needs a checkpoint step number, e.g. 'step 225' (got '${2:-}')" ;;
"") fail "no stage given; $USAGE" ;;
*) fail "unknown stage '$1'; $USAGE" ;;
esac
[ -f .venv/bin/activate ] || fail "no .venv here: run 'bash scripts/setup.sh' first"
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per job: on the shared 2-core machine it is faster
OUT=experiments/results
LIMIT=${LIMIT:-30}                             # GSM8K test prompts for the agreement task and held-out rows for loss
DRAFT=runs/draft-quality
CONFIG=experiments/configs/draft-quality.yaml  # the recipe
ONPOLICY=runs/onpolicy                         # the on-policy stage's prompts, answers and training run
# SoFT without distillation to compare with: the same-steps baseline when it has been trained, else the 40-step one.
SOFT=${SOFT:-$([ -f runs/draft-quality-soft/final/sorted_config.json ] && echo runs/draft-quality-soft/final \
    || echo runs/quickstart/final)}

have() { [ -f "$1/sorted_config.json" ]; }

need_recipe() { have "$DRAFT/final" || fail "no $DRAFT/final yet: run '$0 train' first"; }

train() {  # train <output_dir> <args...> : skipped when <output_dir>/final exists, else started or resumed
    local dir=$1; shift
    have "$dir/final" && { echo "have $dir/final"; return; }
    sortedllm train "$@" --output_dir "$dir" --resume auto
}

evaluate() {  # evaluate <name> <args...> : skipped when its results.json exists
    local name=$1; shift
    [ -f "$OUT/$name/results.json" ] && { echo "have $OUT/$name (delete it to measure again)"; return; }
    sortedllm evaluate "$@" --output_dir "$OUT/$name"
}

stage_train() { train "$DRAFT" --config "$CONFIG"; }

stage_baseline() { train runs/draft-quality-soft --config "$CONFIG" --distill_alpha 0; }

stage_eval() {
    need_recipe
    [ "$SOFT" = runs/quickstart/final ] && train runs/quickstart --config configs/quickstart.yaml
    have "$SOFT" || fail "no SoFT checkpoint at $SOFT (set SOFT=...)"
    echo "comparing with SoFT checkpoint $SOFT"
    evaluate draft-quality --model "$DRAFT/final" --compare "$SOFT" --names soft-distill,soft \
        --tasks loss,agreement --limit "$LIMIT"
}

stage_equal40() {  # the same 40 steps (configs/quickstart.yaml) with and without distillation
    train runs/quickstart --config configs/quickstart.yaml
    train runs/distill40 --config configs/quickstart.yaml --distill_alpha 0.8
    evaluate draft-quality-40 --model runs/distill40/final --compare runs/quickstart/final --names soft-distill,soft \
        --tasks loss,agreement --limit "$LIMIT"
    # The same with the last exit carrying half the loss (the recipe's weighting).
    train runs/distill40w --config configs/quickstart.yaml --distill_alpha 0.8 --exit_schedule weights \
        --exit_weights 1,1,1,1,1,1,1,7
    evaluate draft-quality-40w --model runs/distill40w/final --names soft-distill-lastw --tasks loss,agreement \
        --limit "$LIMIT"
}

stage_step() {  # the recipe and its baseline at the same checkpoint: equal steps before either run has finished
    local n=$1 a="$DRAFT/checkpoint-$1" b="runs/draft-quality-soft/checkpoint-$1"
    have "$a" && have "$b" || fail "need $a and $b: run 'train' and 'baseline' past step $n"
    evaluate "draft-quality-equal-$n" --model "$a" --compare "$b" --names soft-distill,soft --tasks loss,agreement \
        --limit "$LIMIT"
}

stage_onpolicy() {  # distil on the model's own greedy answers, where `agreement` is measured, not on the references
    local from=$DRAFT/checkpoint-225 data=$ONPOLICY dir=$ONPOLICY/distill  # the names below say 225 and 285
    have "$from" || fail "need $from: run 'train' past step 225"
    mkdir -p "$data"
    if [ ! -f "$data/train.jsonl" ]; then
        # 320 GSM8K training questions the recipe never saw: the built-in copy holds the first 1,000 of the 7,473 in
        # ../shared/data (this machine's copy of the full split; GSM8K_TRAIN= points elsewhere).
        python -c 'import json, sys; seen = {json.loads(l)["question"] for l in open(sys.argv[2])}
rows = [json.loads(l) for l in open(sys.argv[1])]
fresh = [r["question"] for r in rows if r["question"] not in seen][:320]
print("\n".join(json.dumps({"prompt": q}) for q in fresh))' "${GSM8K_TRAIN:-../shared/data/gsm8k/train.jsonl}" \
            sortedllm/data/builtin/gsm8k/train.jsonl > "$data/prompts.jsonl"
        sortedllm generate --model "$from" --prompts_file "$data/prompts.jsonl" --jsonl --batch_size 16 \
            --max_new_tokens 256 --threads 1 > "$data/gen.jsonl"
        # keep the answers that ended on their own (a reply cut at 256 tokens would teach an end-of-turn mid-answer)
        python -c 'import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]
print("\n".join(json.dumps({"prompt": r["prompt"], "completion": r["text"]}) for r in rows
                if r["finish_reason"] == "stop"))' "$data/gen.jsonl" > "$data/train.jsonl.tmp"
        mv "$data/train.jsonl.tmp" "$data/train.jsonl"
    fi
    # alpha 1: the students learn only the last layer's distribution; the last exit keeps its cross-entropy (weight 7)
    train "$dir" --config "$CONFIG" --model "$from" --data "$data/train.jsonl" --distill_alpha 1.0 \
        --max_steps 60 --learning_rate 1e-4 --warmup_steps 0 --save_steps 20
    evaluate draft-quality-onpolicy --model "$dir/final" --compare "$from" --names onpolicy-285,distill-225 \
        --tasks loss,agreement --limit "$LIMIT"
}

stage_focus() {  # all of the students' loss on exit 9: exits 9 and 30 only, pure distillation (alpha 1) at exit 9
    need_recipe
    [ -f "$ONPOLICY/train.jsonl" ] || fail "need $ONPOLICY/train.jsonl: run '$0 onpolicy' first"
    train runs/focus9 --config "$CONFIG" --model "$DRAFT/final" --data "$ONPOLICY/train.jsonl" \
        --exits 9,30 --exit_weights 1,1 --distill_alpha 1.0 --max_steps 300 --learning_rate 1e-4 --warmup_steps 0 \
        --save_steps 50 --save_total_limit 1
    # held-out loss on the recipe's data (GSM8K + Alpaca test rows), not on the model's own answers it trained on
    evaluate draft-quality-focus9 --model runs/focus9/final --compare "$DRAFT/final" --names focus9,recipe \
        --tasks loss,agreement --exits 9,30 --data_file "loss=gsm8k:test+alpaca:test" --limit "$LIMIT"
}

stage_oracle() {  # the best any confidence early-exit rule could do with the recipe's exits, per task
    need_recipe
    for task in gsm8k triviaqa pandalm; do
        evaluate "early-exit-oracle-$task" --model "$DRAFT/final" --names draft-quality --tasks agreement \
            --data_file "agreement=$task:test" --limit "$LIMIT"
    done
}

stage_draftlayer() {  # a trained draft layer on the frozen recipe (Kangaroo-style), at exit 9's draft cost:
    need_recipe         # layers 1..7 shared + trained copies of layers 8 and 9 + norm + the draft head's 8k rows
    if [ ! -f runs/draft-layer/draft_layer.safetensors ]; then
        # 3,500 GSM8K training rows need the full split (../shared/data here; the built-in copy holds 1,000)
        SORTEDLLM_DATA_DIR=${SORTEDLLM_DATA_DIR:-../shared/data} sortedllm train --mode draft --base "$DRAFT/final" \
            --draft_shared 7 --draft_layers 2 --data gsm8k --data_limit 3500 --max_steps 2500 --learning_rate 1e-3 \
            --per_device_train_batch_size 8 --max_length 384 --output_dir runs/draft-layer
    fi
    # the recipe's exits and its draft layer, on the same 30 GSM8K test prompts as the other agreement results
    evaluate draft-layer --model "$DRAFT/final" --names draft-quality --tasks agreement --limit "$LIMIT" \
        --draft_layer runs/draft-layer/draft_layer.safetensors
}

case $1 in  # checked at the top
train) stage_train ;;
baseline) stage_baseline ;;
eval) stage_eval ;;
equal40) stage_equal40 ;;
step) stage_step "$2" ;;
onpolicy) stage_onpolicy ;;
focus) stage_focus ;;
oracle) stage_oracle ;;
draftlayer) stage_draftlayer ;;
all) stage_train; stage_eval; stage_equal40 ;;
esac
