from . import translation_kd  # noqa: F401
