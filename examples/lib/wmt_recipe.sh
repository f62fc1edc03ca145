# The pipeline shared by examples/wmt14_en_de.sh, wmt14_en_fr.sh and wmt16_en_ro.sh (sourced, not run).
#
# A recipe sets the pair and its corpora, then calls `recipe_main "$@"`:
#   NAME                 name of the recipe (default work folder, log prefix)
#   SRC, TGT             language codes
#   CORPUS_URLS          archives holding the parallel training corpora
#   TRAIN_CORPORA        corpus prefixes inside $WORK/orig (files <prefix>.$SRC and <prefix>.$TGT, or .gz)
#   VALID_SET, TEST_SET  sacreBLEU test set names (sacrebleu -t NAME -l $SRC-$TGT)
#   PAIR_VOCAB_SIZE      joint sentencepiece vocabulary (VOCAB_SIZE overrides it)
# Every other setting below is a variable with a default; set it in the environment to change it.
# Steps run in the order of STEPS; each writes $WORK/done/<step> (atomically) when it has finished
# and is skipped while that file exists. Remove the file to redo a step. A training step that was
# killed resumes from fairseq's checkpoint_last.pt; tiekd-seqkd and tiekd-iterate resume themselves.

set -euo pipefail

STEPS=(data spm binarize teacher ce wordkd seqkd tiekd iterate eval)
declare -A NEEDS=(
    [data]="" [spm]="data" [binarize]="spm" [teacher]="binarize" [ce]="binarize" [wordkd]="teacher"
    [seqkd]="teacher" [tiekd]="teacher" [iterate]="tiekd" [eval]="teacher ce wordkd seqkd tiekd iterate"
)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TOOLS=$REPO/examples/lib/recipe_tools.py
DEMO=$REPO/examples/demo/data

log() { echo "[$NAME] $*"; }
fail() { echo "$NAME.sh: error: $*" >&2; exit 2; }

# default VAR FULL SMOKE: VAR keeps a value set in the environment, else takes FULL, or SMOKE when SMOKE=1.
default() {
    if [[ -z ${!1:-} ]]; then
        if [[ $SMOKE == 1 ]]; then printf -v "$1" '%s' "$3"; else printf -v "$1" '%s' "$2"; fi
    fi
}

settings() {
    SMOKE=${SMOKE:-0}
    [[ $SMOKE == 0 || $SMOKE == 1 ]] || fail "SMOKE must be 0 or 1, not '$SMOKE'"
    default WORK "work/$NAME" "work/$NAME-smoke"
    WORK=$(realpath -m "$WORK")  # absolute: checkpoints record the data path
    PYTHON=${PYTHON:-python}
    USER_DIR=${USER_DIR:-$REPO/tiekd_fairseq}
    WORKERS=${WORKERS:-$(nproc)}
    # Data. SMOKE=1 reads the shipped English-German demo corpus instead of downloading anything.
    default SPM_SENTENCES 10000000 0
    default MONO_URL http://data.statmt.org/news-crawl/en/news.2017.en.shuffled.deduped.gz ""
    default MONO_LINES 4000000 100
    default SMOKE_TRAIN_LINES "" 800
    default SMOKE_TEST_LINES "" 40
    default SMOKE_MAX_WORDS "" 12
    MAX_LEN=${MAX_LEN:-250}
    LEN_RATIO=${LEN_RATIO:-1.5}
    default VOCAB_SIZE "$PAIR_VOCAB_SIZE" 1000
    # Training. Tokens per update: GPUS x MAX_TOKENS x UPDATE_FREQ (the paper: 4 x 4096 x 2);
    # GPUS defaults to the visible GPUs and UPDATE_FREQ to 8 / GPUS.
    default MAX_TOKENS 4096 1024
    # Smoke models: 1+1 layers, width 64 (teacher) or 32 (students); 64 target positions cap decoding
    # at 63 tokens, which keeps the barely trained models from decoding 200 tokens a sentence.
    default TEACHER_ARCH "--arch transformer_vaswani_wmt_en_de_big --share-all-embeddings" \
        "--arch transformer --share-all-embeddings --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 64
         --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128
         --encoder-attention-heads 2 --decoder-attention-heads 2 --max-target-positions 64"
    default STUDENT_ARCH "--arch transformer --share-all-embeddings" \
        "--arch transformer --share-all-embeddings --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32
         --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64
         --encoder-attention-heads 2 --decoder-attention-heads 2 --max-target-positions 64"
    default TEACHER_UPDATES 300000 60
    default STUDENT_UPDATES 200000 40
    default TEACHER_LR 5e-4 5e-3
    default STUDENT_LR 7e-4 5e-3
    TEACHER_DROPOUT=${TEACHER_DROPOUT:-0.3}
    STUDENT_DROPOUT=${STUDENT_DROPOUT:-0.1}
    default WARMUP 4000 20
    default SAVE_INTERVAL 2000 20
    default AVERAGE 5 2
    default LOG_INTERVAL 100 20
    LABEL_SMOOTHING=${LABEL_SMOOTHING:-0.1}
    SEED=${SEED:-1}
    # Extra flags for every fairseq-train. In smoke mode, batches of 8 sentences keep the few updates
    # within the first epoch (fairseq writes no checkpoint_<epoch>_<update>.pt at the end of an epoch),
    # and loading in the training process saves starting a loader process per epoch.
    default FAIRSEQ_FLAGS "" "--batch-size 8 --num-workers 0"
    # Distillation.
    KD_ALPHA=${KD_ALPHA:-0.5}
    KD_TOPK=${KD_TOPK:-5}
    KD_ITERATIONS=${KD_ITERATIONS:-3}
    SEQKD_BEAM=${SEQKD_BEAM:-5}
    # The iterative stage: rounds of TIE-KD with source-only text, from the TIE-KD student
    # (rounds and updates per round are not given in the paper: tune them).
    default ITER_ROUNDS 4 2
    default ITER_UPDATES 50000 20
    ITER_PATIENCE=${ITER_PATIENCE:-2}
    MONO_RATIO=${MONO_RATIO:-0.5}
    # Decoding and scoring (the paper: beam 4, length penalty 0.6).
    BEAM=${BEAM:-4}
    LENPEN=${LENPEN:-0.6}
    default DECODE_TOKENS 8192 4096
    default BOOTSTRAP 1000 100
    DATA_BIN=$WORK/data-bin
    CKPT=$WORK/checkpoints
}

# Device flags, worked out once, before the first step that trains or decodes (importing torch takes seconds).
# Without a GPU everything runs on the CPU, in one process.
devices() {
    [[ -v TRAIN_FLAGS ]] && return
    local visible
    visible=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    if (( visible == 0 )); then
        CPU=(--cpu) GPUS=1 FP16=${FP16:-}
    else
        CPU=() GPUS=${GPUS:-$visible} FP16=${FP16-"--fp16"}
        (( GPUS <= visible )) || fail "GPUS=$GPUS but only $visible GPUs are visible"
    fi
    default UPDATE_FREQ $(( (8 + GPUS - 1) / GPUS )) 1
    # For fairseq-train and the training flags after tiekd-iterate's `--` (where --cpu and --user-dir are its own).
    TRAIN_FLAGS=(
        --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.0 --weight-decay 0.0
        --lr-scheduler inverse_sqrt --warmup-init-lr 1e-07 --warmup-updates "$WARMUP"
        --label-smoothing "$LABEL_SMOOTHING" --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ"
        --distributed-world-size "$GPUS" --save-interval-updates "$SAVE_INTERVAL"
        --keep-interval-updates "$AVERAGE" --no-epoch-checkpoints --seed "$SEED"
        --log-format simple --log-interval "$LOG_INTERVAL" $FP16 $FAIRSEQ_FLAGS
    )
    STUDENT_FLAGS=($STUDENT_ARCH --dropout "$STUDENT_DROPOUT" --lr "$STUDENT_LR" "${TRAIN_FLAGS[@]}")
    KD_FLAGS=(--kd-alpha "$KD_ALPHA")
    TIE_KD_FLAGS=(--kd-alpha "$KD_ALPHA" --kd-topk "$KD_TOPK" --kd-iterations "$KD_ITERATIONS" --rank-weight 1.0)
}

# train DATA SAVE_DIR FLAGS...: fairseq-train, resuming from SAVE_DIR/checkpoint_last.pt if a run was cut short.
train() {
    local data=$1 save_dir=$2
    shift 2
    fairseq-train "$data" --user-dir "$USER_DIR" --save-dir "$save_dir" "${CPU[@]}" "$@"
}

step_data() {
    rm -rf "$WORK/raw" "$WORK/text"
    mkdir -p "$WORK/raw" "$WORK/text"
    local train
    if [[ $SMOKE == 1 ]]; then
        # The demo corpus is English-German; smoke mode files its German side under $TGT whatever
        # the pair, so it checks that every step runs, not the pair's quality.
        "$PYTHON" "$TOOLS" demo --demo-dir "$DEMO" --out "$WORK/raw" --langs "$SRC" "$TGT" \
            --lines "$SMOKE_TRAIN_LINES" "$SMOKE_TEST_LINES" "$MONO_LINES" --max-words "$SMOKE_MAX_WORDS"
        train=("$WORK/raw/train")
    else
        fetch_corpora
        train=("${TRAIN_CORPORA[@]/#/$WORK/orig/}")
    fi
    "$PYTHON" "$TOOLS" prepare --out "$WORK/text" --langs "$SRC" "$TGT" --train "${train[@]}" \
        --valid "$WORK/raw/valid" --test "$WORK/raw/test" --mono "$WORK/raw/mono.$SRC"
}

# Downloads (kept in $WORK/orig, each renamed into place when complete) and the test sets through sacreBLEU.
fetch_corpora() {
    local orig=$WORK/orig url file prefix lang
    mkdir -p "$orig"
    for url in "${CORPUS_URLS[@]}" "$MONO_URL"; do
        file=$orig/$(basename "$url")
        if [[ ! -s $file ]]; then
            curl -fL --retry 3 -o "$file.part" "$url"
            mv "$file.part" "$file"
        fi
        case $file in
            *.tgz|*.tar.gz) tar -xzf "$file" -C "$orig" ;;
            *.tar) tar -xf "$file" -C "$orig" ;;
            *.zip) "$PYTHON" -m zipfile -e "$file" "$orig" ;;
        esac
    done
    for prefix in "${TRAIN_CORPORA[@]}"; do
        for lang in "$SRC" "$TGT"; do
            [[ -f $orig/$prefix.$lang ]] || gunzip -c "$orig/$prefix.$lang.gz" > "$orig/$prefix.$lang"
        done
    done
    head -n "$MONO_LINES" <(gunzip -c "$orig/$(basename "$MONO_URL")") > "$WORK/raw/mono.$SRC"
    local split testset side
    for split in valid test; do
        testset=$VALID_SET
        [[ $split == test ]] && testset=$TEST_SET
        for side in src ref; do
            lang=$SRC
            [[ $side == ref ]] && lang=$TGT
            SACREBLEU=$orig/sacrebleu sacrebleu -t "$testset" -l "$SRC-$TGT" --echo "$side" > "$WORK/raw/$split.$lang"
        done
    done
}

step_spm() {
    rm -rf "$WORK/spm"
    mkdir -p "$WORK/spm"
    "$PYTHON" "$TOOLS" spm --text "$WORK/text" --out "$WORK/spm" --langs "$SRC" "$TGT" --vocab-size "$VOCAB_SIZE" \
        --sentences "$SPM_SENTENCES" --max-len "$MAX_LEN" --ratio "$LEN_RATIO" --threads "$WORKERS"
}

step_binarize() {
    rm -rf "$DATA_BIN"
    fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --trainpref "$WORK/spm/train" \
        --validpref "$WORK/spm/valid" --testpref "$WORK/spm/test" --destdir "$DATA_BIN" \
        --joined-dictionary --workers "$WORKERS"
}

step_teacher() {
    train "$DATA_BIN" "$CKPT/teacher" $TEACHER_ARCH --dropout "$TEACHER_DROPOUT" --lr "$TEACHER_LR" \
        --max-update "$TEACHER_UPDATES" --criterion label_smoothed_cross_entropy "${TRAIN_FLAGS[@]}"
    # The students learn from, and the table reports, the average of the teacher's last checkpoints.
    "$PYTHON" "$TOOLS" average "$CKPT/teacher" --last "$AVERAGE" --out "$CKPT/teacher/average.pt"
}

step_ce() {
    train "$DATA_BIN" "$CKPT/ce" "${STUDENT_FLAGS[@]}" --max-update "$STUDENT_UPDATES" \
        --criterion label_smoothed_cross_entropy
}

kd_train() {  # kd_train NAME CRITERION FLAGS...
    local name=$1
    shift
    train "$DATA_BIN" "$CKPT/$name" "${STUDENT_FLAGS[@]}" --max-update "$STUDENT_UPDATES" \
        --task translation_kd --teacher "$CKPT/teacher/average.pt" --criterion "$@"
}

step_wordkd() { kd_train word_kd word_kd "${KD_FLAGS[@]}"; }

step_tiekd() { kd_train tie_kd tie_kd "${TIE_KD_FLAGS[@]}"; }

step_seqkd() {
    tiekd-seqkd --data-bin "$DATA_BIN" --subset train --teacher "$CKPT/teacher/average.pt" --out "$WORK/seqkd-data" \
        --beam "$SEQKD_BEAM" --max-tokens "$DECODE_TOKENS" "${CPU[@]}"
    train "$WORK/seqkd-data/data-bin" "$CKPT/seq_kd" "${STUDENT_FLAGS[@]}" --max-update "$STUDENT_UPDATES" \
        --criterion label_smoothed_cross_entropy
}

step_iterate() {
    tiekd-iterate --data-bin "$DATA_BIN" --mono "$WORK/text/mono.$SRC" --spm-model "$WORK/spm/spm.model" \
        --teacher "$CKPT/teacher/average.pt" --student-init "$CKPT/tie_kd/checkpoint_best.pt" \
        --save-dir "$CKPT/iterate" --valid-ref "$WORK/raw/valid.$TGT" --rounds "$ITER_ROUNDS" \
        --patience "$ITER_PATIENCE" --beam "$BEAM" --lenpen "$LENPEN" "${CPU[@]}" \
        -- "${STUDENT_FLAGS[@]}" --max-update "$ITER_UPDATES" "${TIE_KD_FLAGS[@]}" --mono-ratio "$MONO_RATIO"
}

step_eval() {
    # The trained students are averaged over their last $AVERAGE checkpoints; the teacher's average
    # exists already and the iterative stage gives its best round's checkpoint.
    tiekd-eval --data-bin "$DATA_BIN" "$CKPT/ce" "$CKPT/word_kd" "$CKPT/seq_kd" "$CKPT/tie_kd" \
        "$CKPT/iterate/checkpoint_best.pt" "$CKPT/teacher/average.pt" \
        --names ce word_kd seq_kd tie_kd iterate teacher --average-last "$AVERAGE" --average-updates \
        --ref "$WORK/raw/test.$TGT" --spm-model "$WORK/spm/spm.model" --beam "$BEAM" --lenpen "$LENPEN" \
        --max-tokens "$DECODE_TOKENS" --bootstrap-samples "$BOOTSTRAP" --out "$WORK/results" "${CPU[@]}"
}

run_step() {
    local step=$1 dep status=0
    if [[ -e $WORK/done/$step ]]; then
        log "$step: skip (done; remove $WORK/done/$step to redo it)"
        return
    fi
    for dep in ${NEEDS[$step]}; do
        [[ -e $WORK/done/$dep ]] || fail "step $step needs step $dep first (no $WORK/done/$dep)"
    done
    [[ " data spm binarize " == *" $step "* ]] || devices
    log "$step: running, log in $WORK/logs/$step.log"
    # In a subshell outside any condition, so that `set -e` stops the step at its first failing command.
    set +e
    ( set -e; "step_$step" ) > "$WORK/logs/$step.log" 2>&1
    status=$?
    set -e
    if (( status != 0 )); then
        tail -n 20 "$WORK/logs/$step.log" >&2
        echo "$NAME.sh: error: step $step failed (exit $status); log: $WORK/logs/$step.log" >&2
        exit 1
    fi
    date > "$WORK/done/.$step.tmp"
    mv "$WORK/done/.$step.tmp" "$WORK/done/$step"
    log "$step: done"
}

recipe_main() {
    local arg step
    for arg in "$@"; do
        case $arg in
            -h|--help)
                echo "usage: [SMOKE=1] [WORK=DIR] [GPUS=N] ... bash $0 [step ...]   (steps: ${STEPS[*]}; default: all)"
                return ;;
        esac
        for step in "${STEPS[@]}" ""; do
            [[ $arg == "$step" ]] && break
        done
        [[ -n $step ]] || fail "unknown step '$arg' (steps: ${STEPS[*]})"
    done
    settings
    mkdir -p "$WORK/done" "$WORK/logs"
    for step in "${STEPS[@]}"; do
        if (( $# == 0 )) || [[ " $* " == *" $step "* ]]; then
            run_step "$step"
        fi
    done
    if [[ -e $WORK/results/results.md ]]; then
        log "results: $WORK/results/results.md"
        cat "$WORK/results/results.md"
    fi
}
