"""The ``tiekd-*`` commands, one module each, and the helpers they share (as fairseq keeps ``fairseq_cli/``)."""
