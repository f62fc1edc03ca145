from . import tie_kd  # noqa: F401
