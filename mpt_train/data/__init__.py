"""Training data: corpus conversion to MDS shards and streaming text dataloaders.

Public surface (see each module for the why):

* :func:`load_tokenizer`, :data:`SHIPPED_TOKENIZER` -- tokenizers, shipped BPE included.
* :class:`TextLoaderConfig`, :class:`TextDatasetConfig`, :class:`StreamConfig` -- run spec.
* :func:`build_text_dataloader`, :class:`StreamingTextDataset` -- what the trainer consumes.
* :func:`convert_corpus`, :class:`ConvertOptions` -- corpus -> tokenized MDS shards (``mpt-convert``).
"""

from mpt_train.data.config import StreamConfig, TextDatasetConfig, TextLoaderConfig
from mpt_train.data.convert import ConvertOptions, ConvertStats, SplitStats, convert_corpus
from mpt_train.data.dataloader import build_text_dataloader, build_text_dataset
from mpt_train.data.text_dataset import DataReadError, StreamingTextDataset
from mpt_train.data.tokenizer import (
    SHIPPED_CORPUS,
    SHIPPED_TOKENIZER,
    SHIPPED_TOKENIZER_NAME,
    load_tokenizer,
)

__all__ = [
    "SHIPPED_CORPUS",
    "SHIPPED_TOKENIZER",
    "SHIPPED_TOKENIZER_NAME",
    "ConvertOptions",
    "ConvertStats",
    "DataReadError",
    "SplitStats",
    "StreamConfig",
    "StreamingTextDataset",
    "TextDatasetConfig",
    "TextLoaderConfig",
    "build_text_dataloader",
    "build_text_dataset",
    "convert_corpus",
    "load_tokenizer",
]
