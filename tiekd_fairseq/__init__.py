"""TIE-KD for fairseq: load with ``--user-dir`` (the path of this package)."""

# compat first, the patches fairseq and torch need (see compat/); then tie_kd, word_kd and translation_kd register.
from . import compat, criterions, tasks  # noqa: F401
