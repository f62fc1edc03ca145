#!/usr/bin/env bash
# WMT14 English-French: teacher, students (CE, word-KD, Seq-KD, TIE-KD), BLEU table.
# Usage: [SMOKE=1] [WORK=DIR] [GPUS=N] [UPDATE_FREQ=N] ... bash examples/wmt14_en_fr.sh [step ...]
# Training data as in fairseq's prepare-wmt14en2fr.sh (about 36M pairs);
# valid newstest2013, test newstest2014 (full, 3003 sentences). Settings: examples/lib/wmt_recipe.sh.
NAME=wmt14_en_fr SRC=en TGT=fr PAIR_VOCAB_SIZE=40000
# The En-Fr Transformer-big of Vaswani et al. (fairseq's transformer_vaswani_wmt_en_fr_big): dropout 0.1.
PAIR_TEACHER_ARCH=transformer_vaswani_wmt_en_fr_big PAIR_TEACHER_DROPOUT=0.1
CORPUS_URLS=(
    http://statmt.org/wmt13/training-parallel-europarl-v7.tgz
    http://statmt.org/wmt13/training-parallel-commoncrawl.tgz
    http://statmt.org/wmt13/training-parallel-un.tgz
    http://statmt.org/wmt14/training-parallel-nc-v9.tgz
    http://statmt.org/wmt10/training-giga-fren.tar
)
TRAIN_CORPORA=(training/europarl-v7.fr-en commoncrawl.fr-en un/undoc.2000.fr-en training/news-commentary-v9.fr-en
               giga-fren.release2.fixed)
VALID_SET=wmt13 TEST_SET=wmt14/full
source "$(dirname "${BASH_SOURCE[0]}")/lib/wmt_recipe.sh"
recipe_main "$@"
