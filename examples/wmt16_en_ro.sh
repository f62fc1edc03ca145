#!/usr/bin/env bash
# WMT16 English-Romanian: teacher, students (CE, word-KD, Seq-KD, TIE-KD), BLEU table.
# Usage: [SMOKE=1] [WORK=DIR] [GPUS=N] [UPDATE_FREQ=N] ... bash examples/wmt16_en_ro.sh [step ...]
# Training data: Europarl v8 and SETIMES2 (about 610k pairs); valid newsdev2016, test newstest2016.
# Settings: examples/lib/wmt_recipe.sh.
NAME=wmt16_en_ro SRC=en TGT=ro PAIR_VOCAB_SIZE=32000
# A schedule for 610k pairs (about 530 updates of 32k tokens an epoch; the En-De 300k/200k updates
# would be 300-450 epochs): teacher about 95 epochs, students 75, validated every 2 epochs. The
# students scored are their best checkpoints by valid BLEU: on a corpus this small the last
# checkpoints of a long run are past the best. The authors publish no En-Ro script; these are ours.
PAIR_TEACHER_UPDATES=50000 PAIR_STUDENT_UPDATES=40000 PAIR_SAVE_INTERVAL=1000 PAIR_STUDENT_SELECT=best
CORPUS_URLS=(
    http://data.statmt.org/wmt16/translation-task/training-parallel-ep-v8.tgz
    https://object.pouta.csc.fi/OPUS-SETIMES/v2/moses/en-ro.txt.zip
)
TRAIN_CORPORA=(training-parallel-ep-v8/europarl-v8.ro-en SETIMES.en-ro)
VALID_SET=wmt16/dev TEST_SET=wmt16
source "$(dirname "${BASH_SOURCE[0]}")/lib/wmt_recipe.sh"
recipe_main "$@"
