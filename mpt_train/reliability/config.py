"""The ``reliability:`` section of a run spec: what to do when something goes wrong.

Defaults are the safe choices: a corrupted newest checkpoint stops the run (an operator should
know a disk or bucket is eating data) unless fallback is asked for; only checkpoints from the
run's own ``save_folder`` are unpickled without ``trust_checkpoint``; non-finite losses stop the
run with a checkpoint, spikes are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpt_train.errors import ConfigError, check_choice

__all__ = ["GUARD_ACTIONS", "LossGuardConfig", "ReliabilityConfig"]

GUARD_ACTIONS = ("stop", "skip", "warn", "off")


@dataclass
class LossGuardConfig:
    """When a step's loss is NaN/Inf or spikes, ``stop`` (save a checkpoint and fail with the
    step and batch named), ``skip`` (drop that update: weights and optimizer state unchanged),
    ``warn`` (log only) or ``off``.

    A spike is a loss above ``spike_factor`` times the median of the last ``window`` accepted
    losses, judged only once ``min_history`` losses are known (early training falls fast).
    ``max_consecutive_skips`` turns a run that skips forever into a stop: something is wrong
    beyond one bad batch.
    """

    on_nonfinite: str = "stop"
    on_spike: str = "skip"
    spike_factor: float = 2.5
    window: int = 100
    min_history: int = 20
    max_consecutive_skips: int = 5

    def __post_init__(self) -> None:
        check_choice("on_nonfinite", self.on_nonfinite, GUARD_ACTIONS)
        check_choice("on_spike", self.on_spike, GUARD_ACTIONS)
        if not self.spike_factor > 1.0:
            raise ConfigError("spike_factor", f"got {self.spike_factor}, expected > 1")
        if self.window < 1:
            raise ConfigError("window", f"got {self.window}, expected >= 1")
        if self.min_history < 1 or self.min_history > self.window:
            raise ConfigError(
                "min_history", f"got {self.min_history}, expected 1..window ({self.window})"
            )
        if self.max_consecutive_skips < 1:
            raise ConfigError(
                "max_consecutive_skips", f"got {self.max_consecutive_skips}, expected >= 1"
            )


@dataclass
class ReliabilityConfig:
    """Checkpoint integrity, trust and loss guarding.

    Attributes:
        checkpoint_manifest: Write ``<checkpoint>.manifest.json`` (sizes and xxh3-128 checksums)
            atomically after every save, and resume only from checkpoints that have one.
        on_corrupt_checkpoint: ``fail`` (stop, naming the file) or ``fallback`` (quarantine it
            and resume from the previous good checkpoint) when the newest checkpoint does not
            match its manifest.
        trust_checkpoint: Composer checkpoints are pickles and can run code when loaded. A
            ``load_path`` outside this run's ``save_folder`` is refused unless this is true.
        min_free_space_factor: Before each local save, require this many times the previous
            checkpoint's size (or the state's size) free on the disk, so a full disk fails with
            the path named before a partial file is written.
        s3_max_attempts: Attempts per S3 request, with botocore's exponential backoff (up to
            20 s apart), for checkpoint uploads and streamed shards. Composer does not retry a
            refused connection itself and botocore's default (3 attempts in about 2 s) does not
            outlast a restart of the object store; 10 rides out about a minute. Applied as
            ``AWS_MAX_ATTEMPTS`` unless that is already set.
        loss_guard: NaN/Inf/spike handling; null turns it off.
        resume_allow_changes: Spec keys (dotted; a section accepts everything below it) that
            may differ from the spec the resumed checkpoint was saved with, beyond those that
            may always change (``mpt_train.reliability.resume_spec``). Accepted changes are
            logged; weights still load strictly.
        collective_timeout_s: How long any rank waits in one collective (all-gather,
            reduce-scatter, all-reduce, barrier) before the run stops: the bound on a hung or
            lost peer. NCCL's default is 10 minutes and gloo's 30, idle hardware on every other
            node; 300 s still covers the longest one-sided wait of a healthy run (one rank
            writing a checkpoint or fetching a dataset index while the rest wait).
        straggler_timeout_s: A rank that finishes no training event for this long while alive
            is named on rank 0 (with where it is), well before ``collective_timeout_s`` ends the
            run; null turns these warnings off. A rank whose heartbeat stops is named as lost
            either way.
    """

    checkpoint_manifest: bool = True
    on_corrupt_checkpoint: str = "fail"
    trust_checkpoint: bool = False
    min_free_space_factor: float = 1.1
    s3_max_attempts: int = 10
    loss_guard: LossGuardConfig | None = field(default_factory=LossGuardConfig)
    resume_allow_changes: list[str] = field(default_factory=list)
    collective_timeout_s: float = 300.0
    straggler_timeout_s: float | None = 60.0

    def __post_init__(self) -> None:
        self._check_timeouts()
        for i, key in enumerate(self.resume_allow_changes):
            if not isinstance(key, str) or not key:
                raise ConfigError(
                    f"resume_allow_changes[{i}]", f"got {key!r}, expected a dotted spec key"
                )
        if self.s3_max_attempts < 1:
            raise ConfigError("s3_max_attempts", f"got {self.s3_max_attempts}, expected >= 1")
        check_choice("on_corrupt_checkpoint", self.on_corrupt_checkpoint, ("fail", "fallback"))
        if self.min_free_space_factor < 0:
            raise ConfigError(
                "min_free_space_factor", f"got {self.min_free_space_factor}, expected >= 0"
            )

    def _check_timeouts(self) -> None:
        if not self.collective_timeout_s > 0:
            raise ConfigError(
                "collective_timeout_s", f"got {self.collective_timeout_s}, expected seconds > 0"
            )
        straggler = self.straggler_timeout_s
        if straggler is None:
            return
        if not straggler > 0:
            raise ConfigError("straggler_timeout_s", f"got {straggler}, expected seconds > 0")
        if straggler >= self.collective_timeout_s:
            raise ConfigError(
                "straggler_timeout_s",
                f"{straggler} s is not below collective_timeout_s ({self.collective_timeout_s} "
                "s): the run would stop before a stalled rank is named; lower it or set null",
            )
