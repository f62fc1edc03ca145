#!/usr/bin/env bash
# WMT14 English-German: teacher, students (CE, word-KD, Seq-KD, TIE-KD), BLEU table.
# Usage: [SMOKE=1] [WORK=DIR] [GPUS=N] [UPDATE_FREQ=N] ... bash examples/wmt14_en_de.sh [step ...]
# Training data as in fairseq's prepare-wmt14en2de.sh (with the WMT14 News Commentary v9);
# valid newstest2013, test newstest2014 (full, 3003 sentences). Settings: examples/lib/wmt_recipe.sh.
NAME=wmt14_en_de SRC=en TGT=de PAIR_VOCAB_SIZE=32000
CORPUS_URLS=(
    http://statmt.org/wmt13/training-parallel-europarl-v7.tgz
    http://statmt.org/wmt13/training-parallel-commoncrawl.tgz
    http://statmt.org/wmt14/training-parallel-nc-v9.tgz
)
TRAIN_CORPORA=(training/europarl-v7.de-en commoncrawl.de-en training/news-commentary-v9.de-en)
VALID_SET=wmt13 TEST_SET=wmt14/full
source "$(dirname "${BASH_SOURCE[0]}")/lib/wmt_recipe.sh"
recipe_main "$@"
