"""Typed run-spec sections for the training data: ``train_loader`` / ``eval_loader``.

The shape follows llm-foundry's ``train_loader`` (``name``, ``dataset: {...}``, dataloader
knobs) so existing MPT YAMLs read naturally, but every level is a dataclass so that
``OmegaConf.structured`` rejects unknown keys with their dotted path and bad values fail at
load time, not after the cluster has started. Streaming's knobs keep streaming's names and
defaults; see ``streaming.StreamingDataset`` for their full meaning.

Checks that the default instance cannot pass (a data source must be given) live in
:meth:`TextDatasetConfig.check_sources`, which the dataloader builder calls: OmegaConf
instantiates the defaults while building the schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpt_train.errors import ConfigError, check_choice

__all__ = [
    "LOADER_KINDS",
    "SAMPLING_METHODS",
    "SHUFFLE_ALGOS",
    "EvalLoaderConfig",
    "StreamConfig",
    "TextDatasetConfig",
    "TextLoaderConfig",
]

#: ``train_loader.name`` values.
LOADER_KINDS = ("text", "synthetic")
#: Shuffle algorithms streaming 0.13 implements (``streaming.base.shuffle.algos``).
SHUFFLE_ALGOS = ("py1b", "py1br", "py1e", "py1s", "py2s", "naive")
#: ``sampling_method`` values streaming accepts.
SAMPLING_METHODS = ("balanced", "fixed")


def _check_weights(proportion: float | None, repeat: float | None, choose: int | None) -> None:
    given = [
        n
        for n, v in (("proportion", proportion), ("repeat", repeat), ("choose", choose))
        if v is not None
    ]
    if len(given) > 1:
        raise ConfigError(given[1], f"give at most one of proportion/repeat/choose, got {given}")
    for name, value in (("proportion", proportion), ("repeat", repeat), ("choose", choose)):
        if value is not None and value < 0:
            raise ConfigError(name, f"must be >= 0, got {value}")


@dataclass
class StreamConfig:
    """One member of a dataset mixture (a ``streaming.Stream``).

    Attributes:
        remote: Object-store URL (``s3://bucket/prefix``) or ``None`` for local-only data.
        local: Local cache folder (the data itself when ``remote`` is ``None``).
        split: Sub-folder (``train``/``val``); ``None`` uses the dataset-level split.
        proportion: Relative share of each epoch (streams' proportions are normalised).
        repeat: Absolute up/down-sampling factor of this stream per epoch.
        choose: Absolute number of samples taken from this stream per epoch.
    """

    remote: str | None = None
    local: str | None = None
    split: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    # Validated by TextDatasetConfig, which knows the stream's name for the error's key.


@dataclass
class TextDatasetConfig:
    """Where the MDS token shards live and how streaming walks them.

    Attributes:
        remote: Object-store URL of the converted dataset (parent of ``train/``, ``val/``).
        local: Local cache folder, or the dataset itself when ``remote`` is ``None``.
        split: Sub-folder to read.
        streams: Named mixture members; exclusive with ``remote``/``local``.
        max_seq_len: Tokens per sample; longer stored samples are truncated, shorter ones are
            an error (the conversion's ``--concat-tokens`` must be >= this).
        shuffle: Shuffle samples (deterministically from ``shuffle_seed``).
        shuffle_algo: One of :data:`SHUFFLE_ALGOS`.
        shuffle_seed: Seed of the shuffle (and of stream sampling).
        shuffle_block_size: Samples per shuffle block; ``None`` lets streaming choose.
        predownload: Samples to download ahead per worker; ``None`` lets streaming choose.
        cache_limit: Cap on the local cache (``"10gb"``); shards are evicted beyond it.
        epoch_size: Samples per epoch (up/down-samples the streams); ``None`` = all.
        download_retry: Re-attempts per file download before giving up (0: one attempt).
        download_timeout: Seconds per file download.
        validate_hash: Hash algorithm to verify shards with when their index records it
            (``mpt-convert`` writes ``xxh3_64``; a corrupted zstd shard otherwise decompresses
            into garbage without error), or ``None`` to trust them.
        keep_zip: Keep compressed shards after decompressing them into the cache.
        num_canonical_nodes: Streaming's canonical node count (fix it to resume on a
            different number of nodes); ``None`` lets streaming choose.
        partition_algo: Streaming's partitioning algorithm.
        sampling_method: One of :data:`SAMPLING_METHODS`.
        sampling_granularity: Samples drawn per shard at a time when sampling streams.
        batching_method: Streaming's batching method (``random``, ``stratified``, ...).
        eos_token_id: Separator for ``sequence_id``; filled from the tokenizer when ``None``.
    """

    remote: str | None = None
    local: str | None = None
    split: str | None = "train"
    streams: dict[str, StreamConfig] | None = None
    max_seq_len: int = 2048
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    shuffle_seed: int = 9176
    shuffle_block_size: int | None = None
    predownload: int | None = None
    cache_limit: str | None = None
    epoch_size: int | None = None
    download_retry: int = 2
    download_timeout: float = 60.0
    validate_hash: str | None = "xxh3_64"
    keep_zip: bool = False
    num_canonical_nodes: int | None = None
    partition_algo: str = "relaxed"
    sampling_method: str = "balanced"
    sampling_granularity: int = 1
    batching_method: str = "random"
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_seq_len < 1:
            raise ConfigError("max_seq_len", f"must be >= 1, got {self.max_seq_len}")
        if self.shuffle_algo not in SHUFFLE_ALGOS:
            raise ConfigError("shuffle_algo", f"{self.shuffle_algo!r} not in {SHUFFLE_ALGOS}")
        if self.sampling_method not in SAMPLING_METHODS:
            raise ConfigError(
                "sampling_method", f"{self.sampling_method!r} not in {SAMPLING_METHODS}"
            )
        if self.shuffle_seed < 0:
            raise ConfigError("shuffle_seed", f"must be >= 0, got {self.shuffle_seed}")
        for name in ("shuffle_block_size", "predownload", "epoch_size", "num_canonical_nodes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1 or null, got {value}")
        if self.download_retry < 0:
            raise ConfigError("download_retry", f"must be >= 0, got {self.download_retry}")
        if self.download_timeout <= 0:
            raise ConfigError("download_timeout", f"must be > 0, got {self.download_timeout}")
        if self.sampling_granularity < 1:
            raise ConfigError("sampling_granularity", "must be >= 1")
        if self.streams is not None:
            if self.remote is not None or self.local is not None:
                raise ConfigError(
                    "streams", "give either streams or remote/local at the dataset level, not both"
                )
            if not self.streams:
                raise ConfigError("streams", "is empty; give at least one stream or null")
            for name, stream in self.streams.items():
                try:
                    _check_weights(stream.proportion, stream.repeat, stream.choose)
                except ConfigError as err:
                    raise err.with_prefix(f"streams.{name}") from None

    def check_sources(self) -> None:
        """Raise :class:`ConfigError` unless every stream names a remote or a local folder."""
        if self.streams is None:
            if self.remote is None and self.local is None:
                raise ConfigError("local", "give `remote` and/or `local` (or `streams`)")
            return
        for name, stream in self.streams.items():
            if stream.remote is None and stream.local is None:
                raise ConfigError(f"streams.{name}.local", "give `remote` and/or `local`")


@dataclass
class TextLoaderConfig:
    """A ``train_loader``/``eval_loader`` section: dataset plus ``torch`` DataLoader knobs.

    Attributes:
        name: ``"text"`` (tokenized MDS shards) or ``"synthetic"`` (uniform random ids of
            ``dataset.max_seq_len``, no files and no tokenizer: benchmarks and smoke tests;
            see :mod:`mpt_train.data.synthetic`).
        dataset: The streaming dataset section.
        drop_last: Drop the last incomplete batch (keeps every training step the same shape).
            Eval sections default to false (:class:`EvalLoaderConfig`).
        num_workers: DataLoader worker processes (0 = load in the training process).
        prefetch_factor: Batches prefetched per worker; ignored (None) when num_workers is 0.
        pin_memory: Pin host memory for faster host-to-GPU copies.
        persistent_workers: Keep workers alive between epochs; ignored when num_workers is 0.
        timeout: Seconds to wait for a batch from a worker (0 = forever).
    """

    name: str = "text"
    dataset: TextDatasetConfig = field(default_factory=TextDatasetConfig)
    drop_last: bool = True
    num_workers: int = 8
    prefetch_factor: int | None = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    timeout: float = 0.0

    def __post_init__(self) -> None:
        check_choice("name", self.name, LOADER_KINDS)
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            raise ConfigError(
                "prefetch_factor", f"must be >= 1 or null, got {self.prefetch_factor}"
            )
        if self.timeout < 0:
            raise ConfigError("timeout", f"must be >= 0, got {self.timeout}")


@dataclass
class EvalLoaderConfig(TextLoaderConfig):
    """An ``eval_loader`` / ``eval_loaders.<label>`` section: a loader that scores every sample.

    Same keys as :class:`TextLoaderConfig`, but ``drop_last`` defaults to false: dropping the
    last partial batch would leave up to ``device_eval_batch_size * ranks - 1`` validation
    samples unscored. The smaller last batch costs one more shape to compile when
    ``compile.enabled`` (once per eval set). On several ranks streaming repeats a few samples
    so that every rank gets as many as the others; those are scored twice.
    """

    drop_last: bool = False
