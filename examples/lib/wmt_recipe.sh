# The pipeline shared by examples/wmt14_en_de.sh, wmt14_en_fr.sh and wmt16_en_ro.sh (sourced, not run).
#
# A recipe sets the pair and its corpora, then calls `recipe_main "$@"`:
#   NAME                 name of the recipe (default work folder, log prefix)
#   SRC, TGT             language codes
#   CORPUS_URLS          archives holding the parallel training corpora
#   TRAIN_CORPORA        corpus prefixes inside $WORK/orig (files <prefix>.$SRC and <prefix>.$TGT, or .gz)
#   VALID_SET, TEST_SET  sacreBLEU test set names (sacrebleu -t NAME -l $SRC-$TGT)
#   PAIR_VOCAB_SIZE      joint sentencepiece vocabulary (VOCAB_SIZE overrides it)
#   PAIR_*               optional: the pair's own defaults of TEACHER_ARCH's architecture, TEACHER_DROPOUT,
#                        TEACHER_UPDATES, STUDENT_UPDATES, SAVE_INTERVAL and STUDENT_SELECT
# Every other setting below is a variable with a default; set it in the environment to change it.
# DRY_RUN=1 prints the command lines the steps would run (for GPUS GPUs, 4 by default) and runs nothing.
# The defaults are the authors' (songmzhang/NMT-KD, train_ende_*.sh); where one differs, the
# comment beside it says why and the authors' value is one variable away.
#
# Steps run in the order of STEPS; each writes $WORK/done/<step> (atomically) when it has finished
# and is skipped while that file exists. A step that starts with no $WORK/started/<step> marker
# starts afresh: it clears its outputs and the done-markers of every step depending on it, so
# removing $WORK/done/<step> redoes that step and what was made from it. A step that was killed
# (its started-marker still there) resumes: training from fairseq's checkpoint_last.pt (a truncated
# one replaced first by the newest intact interval checkpoint), tiekd-seqkd and tiekd-iterate by themselves.

set -euo pipefail

STEPS=(data spm binarize teacher ce wordkd seqkd tiekd iterate eval)
# What a step cannot run without, and what it reads (redoing one of those redoes the step).
declare -A NEEDS=(
    [data]="" [spm]="data" [binarize]="spm" [teacher]="binarize" [ce]="binarize" [wordkd]="teacher"
    [seqkd]="teacher" [tiekd]="teacher" [iterate]="tiekd" [eval]="teacher"
)
declare -A READS=([eval]="ce wordkd seqkd tiekd iterate")
# The steps that decode or train, on a GPU unless SMOKE=1 or ALLOW_CPU=1; those that resume when rerun.
DEVICE_STEPS=" teacher ce wordkd seqkd tiekd iterate eval "
RESUMING_STEPS=" teacher ce wordkd seqkd tiekd iterate "
# What a step writes, under $WORK.
declare -A OUTPUTS=(
    [data]="raw text" [spm]=spm [binarize]=data-bin [teacher]=checkpoints/teacher [ce]=checkpoints/ce
    [wordkd]=checkpoints/word_kd [seqkd]="seqkd-data checkpoints/seq_kd" [tiekd]=checkpoints/tie_kd
    [iterate]=checkpoints/iterate [eval]=results
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
    DRY_RUN=${DRY_RUN:-0}
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
    # A training pair or source-only line of invalid UTF-8 stops the data step (`skip`: dropped and counted).
    ON_BAD_UTF8=${ON_BAD_UTF8:-stop}
    MAX_LEN=${MAX_LEN:-250}
    LEN_RATIO=${LEN_RATIO:-1.5}
    default VOCAB_SIZE "$PAIR_VOCAB_SIZE" 1000
    # Training. Tokens per update: GPUS x MAX_TOKENS x UPDATE_FREQ (the paper: 4 x 4096 x 2);
    # GPUS defaults to the visible GPUs and UPDATE_FREQ to 8 / GPUS.
    default MAX_TOKENS 4096 1024
    # Smoke models: 1+1 layers, width 64 (teacher) or 32 (students); 64 target positions cap decoding
    # at 63 tokens, which keeps the barely trained models from decoding 200 tokens a sentence.
    default TEACHER_ARCH "--arch ${PAIR_TEACHER_ARCH:-transformer_vaswani_wmt_en_de_big} --share-all-embeddings" \
        "--arch transformer --share-all-embeddings --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 64
         --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128
         --encoder-attention-heads 2 --decoder-attention-heads 2 --max-target-positions 64"
    default STUDENT_ARCH "--arch transformer --share-all-embeddings" \
        "--arch transformer --share-all-embeddings --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32
         --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64
         --encoder-attention-heads 2 --decoder-attention-heads 2 --max-target-positions 64"
    default TEACHER_UPDATES "${PAIR_TEACHER_UPDATES:-300000}" 60
    default STUDENT_UPDATES "${PAIR_STUDENT_UPDATES:-200000}" 40
    default TEACHER_LR 5e-4 5e-3
    default STUDENT_LR 7e-4 5e-3
    TEACHER_DROPOUT=${TEACHER_DROPOUT:-${PAIR_TEACHER_DROPOUT:-0.3}}
    STUDENT_DROPOUT=${STUDENT_DROPOUT:-0.1}
    ATTENTION_DROPOUT=${ATTENTION_DROPOUT:-0.1}
    ACTIVATION_DROPOUT=${ACTIVATION_DROPOUT:-0.1}
    CLIP_NORM=${CLIP_NORM:-5.0}
    default WARMUP 4000 20
    # Checkpoints every SAVE_INTERVAL updates, the last KEEP_INTERVAL kept; the models scored are
    # averages of the last AVERAGE of them up to the last update (the authors: 5 of every 5000, to 200k).
    default SAVE_INTERVAL "${PAIR_SAVE_INTERVAL:-5000}" 20
    default KEEP_INTERVAL 10 3
    default AVERAGE 5 2
    (( KEEP_INTERVAL >= AVERAGE )) || fail "KEEP_INTERVAL=$KEEP_INTERVAL keeps fewer checkpoints than AVERAGE=$AVERAGE"
    # Valid BLEU (beam 4, lenpen 0.6) is logged at every checkpoint, and checkpoint_best.pt is the best
    # by it, as the authors'; `loss`: by valid loss. Smoke mode selects by loss: its barely trained
    # models decode empty hypotheses, for which fairseq logs no BLEU to select by.
    default SELECT_METRIC bleu loss
    [[ $SELECT_METRIC == bleu || $SELECT_METRIC == loss ]] || fail "SELECT_METRIC must be bleu or loss"
    # The students learn from the teacher's checkpoint_best.pt, as the authors (`average`: its average).
    TEACHER_SELECT=${TEACHER_SELECT:-best}
    # The students scored: the average of their last checkpoints, as the authors (`best`: checkpoint_best.pt).
    STUDENT_SELECT=${STUDENT_SELECT:-${PAIR_STUDENT_SELECT:-average}}
    local select
    for select in TEACHER_SELECT STUDENT_SELECT; do
        [[ ${!select} == best || ${!select} == average ]] || fail "$select must be best or average"
    done
    # fairseq's default DDP, which overlaps the gradient all-reduce with the backward pass; the
    # gradients are the same as the authors' legacy_ddp (set DDP_BACKEND=legacy_ddp for theirs).
    DDP_BACKEND=${DDP_BACKEND:-pytorch_ddp}
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
    # The iterate step, our extension (the paper's iterative KD is TIE-KD's N = KD_ITERATIONS passes,
    # which the tiekd step runs): rounds of TIE-KD with source-only text from the TIE-KD student, run
    # only with ITERATE=1 or when named (rounds and updates per round are ours: tune them).
    ITERATE=${ITERATE:-0}
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
    TEACHER_CKPT=$CKPT/teacher/checkpoint_best.pt
    [[ $TEACHER_SELECT == best ]] || TEACHER_CKPT=$CKPT/teacher/average.pt
    STUDENT_FILE=average.pt
    [[ $STUDENT_SELECT == average ]] || STUDENT_FILE=checkpoint_best.pt
}

# The number of GPUs torch sees; a dry run assumes GPUS of them, or 4.
visible_gpus() {
    if [[ $DRY_RUN == 1 ]]; then echo "${GPUS:-4}"; else "$PYTHON" -c 'import torch; print(torch.cuda.device_count())'; fi
}

# execute CMD ARGS...: run a command, or in a dry run print it as a line a shell reads back as the same words.
execute() {
    if [[ $DRY_RUN != 1 ]]; then
        "$@"
        return
    fi
    local arg line=""
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then line+=" $arg"; else line+=" '${arg//\'/\'\\\'\'}'"; fi
    done
    echo "${line# }"
}

# Device flags, worked out once, before the first step that trains or decodes (importing torch takes seconds).
# Without a GPU everything runs on the CPU, in one process.
devices() {
    [[ -v TRAIN_FLAGS ]] && return
    local visible
    visible=$(visible_gpus)
    if (( visible == 0 )); then
        CPU=(--cpu) GPUS=1 FP16=${FP16:-}
    else
        CPU=() GPUS=${GPUS:-$visible} FP16=${FP16-"--fp16"}
        (( GPUS <= visible )) || fail "GPUS=$GPUS but only $visible GPUs are visible"
    fi
    if [[ -z ${UPDATE_FREQ:-} && $SMOKE == 0 ]] && (( 8 % GPUS != 0 )); then
        echo "[$NAME] warning: $GPUS GPUs do not divide the paper's 8 x $MAX_TOKENS tokens per update;" \
             "with UPDATE_FREQ=$(( (8 + GPUS - 1) / GPUS )) an update has $(( (8 + GPUS - 1) / GPUS * GPUS )) x $MAX_TOKENS" >&2
    fi
    default UPDATE_FREQ $(( (8 + GPUS - 1) / GPUS )) 1
    # For fairseq-train and the training flags after tiekd-iterate's `--` (where --cpu and --user-dir are its own).
    TRAIN_FLAGS=(
        --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm "$CLIP_NORM" --weight-decay 0.0
        --lr-scheduler inverse_sqrt --warmup-init-lr 1e-07 --warmup-updates "$WARMUP"
        --label-smoothing "$LABEL_SMOOTHING" --attention-dropout "$ATTENTION_DROPOUT"
        --activation-dropout "$ACTIVATION_DROPOUT" --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ"
        --distributed-world-size "$GPUS" --ddp-backend "$DDP_BACKEND" --save-interval-updates "$SAVE_INTERVAL"
        --keep-interval-updates "$KEEP_INTERVAL" --no-epoch-checkpoints --seed "$SEED"
        --log-format simple --log-interval "$LOG_INTERVAL" $FP16 $FAIRSEQ_FLAGS
    )
    # Valid BLEU and how fairseq-train picks checkpoint_best.pt (not for tiekd-iterate, which picks its rounds).
    SELECT_FLAGS=(--eval-bleu --eval-bleu-args "{\"beam\": $BEAM, \"lenpen\": $LENPEN}" --eval-bleu-remove-bpe sentencepiece)
    if [[ $SELECT_METRIC == bleu ]]; then
        SELECT_FLAGS+=(--best-checkpoint-metric bleu --maximize-best-checkpoint-metric)
    fi
    STUDENT_FLAGS=($STUDENT_ARCH --dropout "$STUDENT_DROPOUT" --lr "$STUDENT_LR" "${TRAIN_FLAGS[@]}")
    KD_FLAGS=(--kd-alpha "$KD_ALPHA")
    TIE_KD_FLAGS=(--kd-alpha "$KD_ALPHA" --kd-topk "$KD_TOPK" --kd-iterations "$KD_ITERATIONS" --rank-weight 1.0)
}

# The hash of the data-bin's dictionaries, computed afresh each time.
dictionaries_hash() { cat "$DATA_BIN/dict.$SRC.txt" "$DATA_BIN/dict.$TGT.txt" | sha256sum | cut -d' ' -f1; }

# check_dictionaries FOLDER: refuse a model folder whose recorded dictionaries are not the data-bin's.
check_dictionaries() {
    [[ $DRY_RUN == 1 ]] && return
    local recorded
    recorded=$(cat "$1/dictionaries.sha256" 2>/dev/null) || fail "$1 records no dictionaries.sha256"
    [[ $recorded == "$(dictionaries_hash)" ]] ||
        fail "$1 was trained with other dictionaries than $DATA_BIN has now; redo its step (remove its done-marker)"
}

# train DATA SAVE_DIR FLAGS...: fairseq-train, resuming from SAVE_DIR/checkpoint_last.pt if a run was cut short.
# The folder records the dictionaries it is trained with, and a resumed run must find the same.
train() {
    local data=$1 save_dir=$2
    shift 2
    if [[ $DRY_RUN != 1 ]]; then
        mkdir -p "$save_dir"
        if [[ -e $save_dir/dictionaries.sha256 ]]; then
            check_dictionaries "$save_dir"
        else
            dictionaries_hash > "$save_dir/dictionaries.sha256"
        fi
        if [[ -e $save_dir/checkpoint_last.pt ]]; then
            "$PYTHON" "$TOOLS" recover "$save_dir"
        fi
    fi
    execute fairseq-train "$data" --user-dir "$USER_DIR" --save-dir "$save_dir" "${CPU[@]}" "$@"
}

# average FOLDER UPDATES: FOLDER/average.pt from its last $AVERAGE checkpoints up to update UPDATES.
average() {
    execute "$PYTHON" "$TOOLS" average "$1" --last "$AVERAGE" --upper-bound "$2" --out "$1/average.pt"
}

step_data() {
    [[ $DRY_RUN == 1 ]] || mkdir -p "$WORK/raw" "$WORK/text"
    local train mono=()
    if [[ $SMOKE == 1 ]]; then
        # The demo corpus is English-German; smoke mode files its German side under $TGT whatever
        # the pair, so it checks that every step runs, not the pair's quality.
        execute "$PYTHON" "$TOOLS" demo --demo-dir "$DEMO" --out "$WORK/raw" --langs "$SRC" "$TGT" \
            --lines "$SMOKE_TRAIN_LINES" "$SMOKE_TEST_LINES" "$MONO_LINES" --max-words "$SMOKE_MAX_WORDS"
        train=("$WORK/raw/train") mono=(--mono "$WORK/raw/mono.$SRC")
    else
        if [[ $DRY_RUN == 1 ]]; then
            echo "# downloads into $WORK/orig, valid and test into $WORK/raw: ${CORPUS_URLS[*]}"
        else
            fetch_corpora
        fi
        train=("${TRAIN_CORPORA[@]/#/$WORK/orig/}")
    fi
    execute "$PYTHON" "$TOOLS" prepare --out "$WORK/text" --langs "$SRC" "$TGT" --train "${train[@]}" \
        --valid "$WORK/raw/valid" --test "$WORK/raw/test" "${mono[@]}" --on-bad-utf8 "$ON_BAD_UTF8"
}

# Downloads (kept in $WORK/orig, each renamed into place when complete, a cut one resumed), each archive
# extracted once, and the test sets through sacreBLEU (its cache in $WORK/orig/sacrebleu).
fetch_corpora() {
    local orig=$WORK/orig url file prefix lang
    mkdir -p "$orig"
    for url in "${CORPUS_URLS[@]}"; do
        file=$orig/$(basename "$url")
        if [[ ! -s $file ]]; then
            curl -fL --retry 3 -C - -o "$file.part" "$url"
            mv "$file.part" "$file"
        fi
        # Into a scratch folder, then linked into place and marked: a cut extraction is redone whole.
        if [[ ! -e $orig/.extracted.${file##*/} ]]; then
            echo "extracting $file"
            rm -rf "$orig/.extracting"
            mkdir "$orig/.extracting"
            case $file in
                *.tgz|*.tar.gz) tar -xzf "$file" -C "$orig/.extracting" ;;
                *.tar) tar -xf "$file" -C "$orig/.extracting" ;;
                *.zip) "$PYTHON" -m zipfile -e "$file" "$orig/.extracting" ;;
            esac
            cp -rlf "$orig/.extracting/." "$orig/"
            rm -rf "$orig/.extracting"
            touch "$orig/.extracted.${file##*/}"
        fi
    done
    for prefix in "${TRAIN_CORPORA[@]}"; do
        for lang in "$SRC" "$TGT"; do
            if [[ ! -f $orig/$prefix.$lang ]]; then
                gunzip -c "$orig/$prefix.$lang.gz" > "$orig/$prefix.$lang.part"
                mv "$orig/$prefix.$lang.part" "$orig/$prefix.$lang"
            fi
        done
    done
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
    [[ $DRY_RUN == 1 ]] || mkdir -p "$WORK/spm"
    execute "$PYTHON" "$TOOLS" spm --text "$WORK/text" --out "$WORK/spm" --langs "$SRC" "$TGT" --vocab-size "$VOCAB_SIZE" \
        --sentences "$SPM_SENTENCES" --max-len "$MAX_LEN" --ratio "$LEN_RATIO" --threads "$WORKERS" --seed "$SEED"
}

step_binarize() {
    execute fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --trainpref "$WORK/spm/train" \
        --validpref "$WORK/spm/valid" --testpref "$WORK/spm/test" --destdir "$DATA_BIN" \
        --joined-dictionary --workers "$WORKERS"
}

step_teacher() {
    train "$DATA_BIN" "$CKPT/teacher" $TEACHER_ARCH --dropout "$TEACHER_DROPOUT" --lr "$TEACHER_LR" \
        --max-update "$TEACHER_UPDATES" --criterion label_smoothed_cross_entropy "${TRAIN_FLAGS[@]}" "${SELECT_FLAGS[@]}"
    average "$CKPT/teacher" "$TEACHER_UPDATES"
}

# student NAME DATA FLAGS...: train a student into $CKPT/NAME, then average it if the table scores averages.
student() {
    local name=$1 data=$2
    shift 2
    train "$data" "$CKPT/$name" "${STUDENT_FLAGS[@]}" --max-update "$STUDENT_UPDATES" "${SELECT_FLAGS[@]}" "$@"
    [[ $STUDENT_SELECT == best ]] || average "$CKPT/$name" "$STUDENT_UPDATES"
}

# The students learn from a teacher trained with the data-bin's dictionaries, not from a stale one.
kd_student() {  # kd_student NAME CRITERION FLAGS...
    local name=$1
    shift
    check_dictionaries "$CKPT/teacher"
    student "$name" "$DATA_BIN" --task translation_kd --teacher "$TEACHER_CKPT" --criterion "$@"
}

step_ce() { student ce "$DATA_BIN" --criterion label_smoothed_cross_entropy; }

step_wordkd() { kd_student word_kd word_kd "${KD_FLAGS[@]}"; }

step_tiekd() { kd_student tie_kd tie_kd "${TIE_KD_FLAGS[@]}"; }

step_seqkd() {
    local precision=fp32
    [[ -z $FP16 ]] || precision=fp16
    check_dictionaries "$CKPT/teacher"
    # One fairseq-generate per GPU over disjoint shards, in the students' precision (fp16 unless FP16= is empty).
    execute tiekd-seqkd --data-bin "$DATA_BIN" --subset train --teacher "$TEACHER_CKPT" --out "$WORK/seqkd-data" \
        --beam "$SEQKD_BEAM" --max-tokens "$DECODE_TOKENS" --workers "$GPUS" --precision "$precision" \
        "${CPU[@]}"
    student seq_kd "$WORK/seqkd-data/data-bin" --criterion label_smoothed_cross_entropy
}

# The first MONO_LINES lines of News Crawl, streamed (only those are downloaded), for the iterate step only.
fetch_mono() {
    local raw=$WORK/orig/mono.$SRC.$MONO_LINES lines
    if [[ $DRY_RUN == 1 ]]; then
        echo "# the first $MONO_LINES lines of $MONO_URL into $raw"
    elif [[ ! -e $raw ]]; then
        mkdir -p "$WORK/orig"
        # head closes the pipe once it has its lines, which stops curl and gunzip with an error.
        ( set +o pipefail; curl -fsSL --retry 3 "$MONO_URL" | gunzip -c | head -n "$MONO_LINES" > "$raw.part" )
        lines=$(wc -l < "$raw.part")
        (( lines == MONO_LINES )) || fail "$MONO_URL gave $lines lines, not MONO_LINES=$MONO_LINES"
        mv "$raw.part" "$raw"
    fi
    execute "$PYTHON" "$TOOLS" mono --text "$raw" --out "$WORK/text/mono.$SRC" --lang "$SRC" \
        --on-bad-utf8 "$ON_BAD_UTF8"
}

step_iterate() {
    check_dictionaries "$CKPT/teacher"
    check_dictionaries "$CKPT/tie_kd"
    [[ $SMOKE == 1 ]] || fetch_mono
    if [[ $DRY_RUN != 1 ]]; then
        mkdir -p "$CKPT/iterate"
        dictionaries_hash > "$CKPT/iterate/dictionaries.sha256"
    fi
    execute tiekd-iterate --data-bin "$DATA_BIN" --mono "$WORK/text/mono.$SRC" --spm-model "$WORK/spm/spm.model" \
        --teacher "$TEACHER_CKPT" --student-init "$CKPT/tie_kd/$STUDENT_FILE" \
        --save-dir "$CKPT/iterate/rounds" --valid-ref "$WORK/raw/valid.$TGT" --rounds "$ITER_ROUNDS" \
        --patience "$ITER_PATIENCE" --beam "$BEAM" --lenpen "$LENPEN" "${CPU[@]}" \
        -- "${STUDENT_FLAGS[@]}" --max-update "$ITER_UPDATES" "${TIE_KD_FLAGS[@]}" --mono-ratio "$MONO_RATIO"
}

# produced STEP: whether STEP is done; in a dry run, whether the run would do it.
produced() {
    if [[ $DRY_RUN != 1 ]]; then
        [[ -e $WORK/done/$1 ]]
    else
        [[ $1 != iterate || $ITERATE == 1 || " ${selected[*]} " == *" iterate "* ]]
    fi
}

step_eval() {
    # Whichever systems are done, then the teacher the students learned from.
    local step systems=() names=()
    local -A folder=([ce]=ce [wordkd]=word_kd [seqkd]=seq_kd [tiekd]=tie_kd)
    for step in ce wordkd seqkd tiekd; do
        if produced "$step"; then
            check_dictionaries "$CKPT/${folder[$step]}"
            systems+=("$CKPT/${folder[$step]}/$STUDENT_FILE") names+=("${folder[$step]}")
        fi
    done
    if produced iterate; then
        check_dictionaries "$CKPT/iterate"
        systems+=("$CKPT/iterate/rounds/checkpoint_best.pt") names+=(iterate_ext)
    fi
    check_dictionaries "$CKPT/teacher"
    systems+=("$TEACHER_CKPT") names+=(teacher)
    execute tiekd-eval --data-bin "$DATA_BIN" "${systems[@]}" --names "${names[@]}" \
        --ref "$WORK/raw/test.$TGT" --spm-model "$WORK/spm/spm.model" --beam "$BEAM" --lenpen "$LENPEN" \
        --max-tokens "$DECODE_TOKENS" --bootstrap-samples "$BOOTSTRAP" --out "$WORK/results" "${CPU[@]}" \
        --tokenized-bleu
    [[ $DRY_RUN != 1 ]] || return 0
    local students="the average of their last $AVERAGE checkpoints up to update $STUDENT_UPDATES"
    [[ $STUDENT_SELECT == average ]] || students="their checkpoint_best.pt (by valid $SELECT_METRIC)"
    {
        echo
        echo "Students: $students; teacher: $(basename "$TEACHER_CKPT") (checkpoint_best.pt: by valid $SELECT_METRIC)."
        echo "BLEU is sacreBLEU on detokenized text (signature above), comparable with other sacreBLEU scores" \
             "of $TEST_SET. tok. BLEU is case-sensitive BLEU on Moses-tokenized text (tokenizer.perl -a, as" \
             "multi-bleu.perl scores it), the convention of the paper's tables (Zhang et al., 2023), and the" \
             "column to compare with them."
        if [[ $TGT == ro ]]; then
            echo "ro norm. tok. BLEU also removes the Romanian diacritics (normalise-romanian.py," \
                 "remove-diacritics.py), the convention of most WMT16 En-Ro tables."
        fi
        if [[ -e $WORK/done/iterate ]]; then
            echo "iterate_ext: our extension, not in the paper: up to $ITER_ROUNDS rounds of $ITER_UPDATES more" \
                 "updates from the TIE-KD student, with $(wc -l < "$WORK/text/mono.$SRC") source-only lines."
        fi
    } >> "$WORK/results/results.md"
}

# The steps that read STEP's outputs, directly or through others.
dependents() {
    local step found=" " changed=1 other
    while (( changed )); do
        changed=0
        for other in "${STEPS[@]}"; do
            [[ $found == *" $other "* ]] && continue
            for step in $1 $found; do
                if [[ " ${NEEDS[$other]} ${READS[$other]:-} " == *" $step "* ]]; then
                    found+="$other "
                    changed=1
                    break
                fi
            done
        done
    done
    echo $found
}

run_step() {
    local step=$1 dep status=0 dependent output
    if [[ -e $WORK/done/$step ]]; then
        log "$step: skip (done; remove $WORK/done/$step to redo it)"
        return
    fi
    for dep in ${NEEDS[$step]}; do
        [[ -e $WORK/done/$dep ]] || fail "step $step needs step $dep first (no $WORK/done/$dep)"
    done
    [[ $DEVICE_STEPS != *" $step "* ]] || devices
    if [[ -e $WORK/started/$step && $RESUMING_STEPS == *" $step "* ]]; then
        log "$step: resuming, log in $WORK/logs/$step.log"
    else
        # Afresh: nothing made from the step's old outputs may stay done, nor be resumed.
        for dependent in $(dependents "$step"); do
            if [[ -e $WORK/done/$dependent || -e $WORK/started/$dependent ]]; then
                log "$step: redoing it redoes $dependent"
                rm -f "$WORK/done/$dependent" "$WORK/started/$dependent"
            fi
        done
        for output in ${OUTPUTS[$step]}; do
            rm -rf "${WORK:?}/$output"
        done
        : > "$WORK/logs/$step.log"
        touch "$WORK/started/$step"
        log "$step: running, log in $WORK/logs/$step.log"
    fi
    # In a subshell outside any condition, so that `set -e` stops the step at its first failing command.
    set +e
    ( set -e; "step_$step" ) >> "$WORK/logs/$step.log" 2>&1
    status=$?
    set -e
    if (( status != 0 )); then
        tail -n 20 "$WORK/logs/$step.log" >&2
        echo "$NAME.sh: error: step $step failed (exit $status); log: $WORK/logs/$step.log" >&2
        exit 1
    fi
    date > "$WORK/done/.$step.tmp"
    mv "$WORK/done/.$step.tmp" "$WORK/done/$step"
    rm "$WORK/started/$step"
    log "$step: done"
}

recipe_main() {
    local arg step selected=()
    for arg in "$@"; do
        case $arg in
            -h|--help)
                echo "usage: [SMOKE=1] [WORK=DIR] [GPUS=N] ... bash $0 [step ...]   (steps: ${STEPS[*]};" \
                     "default: all but iterate, which ITERATE=1 adds)"
                return ;;
        esac
        for step in "${STEPS[@]}" ""; do
            [[ $arg == "$step" ]] && break
        done
        [[ -n $step ]] || fail "unknown step '$arg' (steps: ${STEPS[*]})"
    done
    settings
    for step in "${STEPS[@]}"; do
        if (( $# == 0 )) && [[ $step != iterate || $ITERATE == 1 ]] || [[ " $* " == *" $step "* ]]; then
            selected+=("$step")
        fi
    done
    if [[ $DRY_RUN == 1 ]]; then
        for step in "${selected[@]}"; do
            echo "# step $step"
            [[ $DEVICE_STEPS != *" $step "* ]] || devices
            "step_$step"
        done
        return
    fi
    # Transformer-big on a CPU would take months: stop before anything runs.
    if [[ $SMOKE == 0 && ${ALLOW_CPU:-0} != 1 ]]; then
        for step in "${selected[@]}"; do
            [[ $DEVICE_STEPS == *" $step "* ]] || continue
            (( $(visible_gpus) > 0 )) ||
                fail "no GPU visible for step $step (SMOKE=0 trains Transformer-big); set ALLOW_CPU=1 to use the CPU"
            break
        done
    fi
    mkdir -p "$WORK/done" "$WORK/started" "$WORK/logs"
    for step in "${selected[@]}"; do
        run_step "$step"
    done
    if [[ -e $WORK/results/results.md ]]; then
        log "results: $WORK/results/results.md"
        cat "$WORK/results/results.md"
    fi
}
