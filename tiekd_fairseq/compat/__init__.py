"""The patches of fairseq and torch, each in a module named after what it patches; importing this applies them."""

from . import fairseq_ddp_wrapper, fairseq_infer_init_method, torch_safe_globals  # noqa: F401
