"""mpt-train: pretrain MPT language models from YAML run specs with Composer."""

__version__ = "0.1.0"
