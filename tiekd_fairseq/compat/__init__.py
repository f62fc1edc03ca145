"""The patches of fairseq and torch, each in a module named after what it patches; importing this applies them."""

from . import fairseq_call_main, fairseq_ddp_wrapper, torch_safe_globals  # noqa: F401
