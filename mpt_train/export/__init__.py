"""Reading training checkpoints and moving models to and from Hugging Face MPT folders."""

from mpt_train.export.checkpoint import CheckpointError, LoadedCheckpoint, read_checkpoint
from mpt_train.export.hf import (
    export_hf,
    import_hf,
    is_hf_folder,
    load_model,
    model_config_from_spec,
)

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "export_hf",
    "import_hf",
    "is_hf_folder",
    "load_model",
    "model_config_from_spec",
    "read_checkpoint",
]
