from . import tie_kd, word_kd  # noqa: F401  (register the criteria)
