"""What the code relies on that its dependencies do not promise, and the stack it runs on.

mpt-train is tested on two named stacks (``stacks/``, docs/development.md): ``pinned``, the set
Composer 0.32.1 declares (torch 2.7.0), and ``current``, torch 2.11 with Composer 0.32.1 and
streaming 0.13 installed over their torch bound. Composer's last release will not follow torch,
so everything that depends on a version, or on a private attribute of Composer or streaming,
is listed here: a new release then breaks ``tests/test_compat.py`` instead of a training run.

Where behaviour differs by torch version, the code asks the installed torch
(:func:`torch_version`, :func:`flex_attention_trains_on_cpu`; gloo's ``AVG`` reduction is probed at run time by
:func:`mpt_train.train.gloo_average.reduce_scatter_avg_overcount`).

``python -m mpt_train.compat --stack`` prints the installed stack and the named stack it
matches; GPU figures are recorded with it (``scripts/gpu_checks.sh``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import platform
import re
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "PRIVATE_ATTRIBUTES",
    "STACKS_DIR",
    "StackInfo",
    "flex_attention_trains_on_cpu",
    "installed_stack",
    "main",
    "matching_stack",
    "missing_private_attributes",
    "missing_torch_arguments",
    "read_lock",
    "torch_version",
]

STACKS_DIR = Path(__file__).resolve().parents[1] / "stacks"
STACK_NAMES = ("pinned", "current")
# The packages whose versions name a stack: a GPU figure is comparable across machines only
# when these are equal (the rest of the lock only changes how the run is set up).
CORE_PACKAGES = ("torch", "mosaicml", "mosaicml-streaming")

# Private attributes of Composer, streaming and torch that mpt-train reads, wraps or overrides,
# by "module:Class" (or "module" for its functions). Methods are checked on the class; names set in ``__init__`` or at iteration
# are checked on real instances by the test.
PRIVATE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    # train/builder.py MPTTrainer: the step end beside the update, and no closures.
    "composer.trainer.trainer:Trainer": (
        "_use_closures",
        "_train_microbatches",
        "_train_loop",
        "_train_batch",
        "_accumulate_time_across_ranks",
    ),
    # reliability/checkpoints.py: the save guard wraps the save, rotates checkpoints itself and
    # polls the uploader's symlink sooner.
    "composer.callbacks.checkpoint_saver:CheckpointSaver": (
        "_save_checkpoint",
        "_rotate_checkpoints",
        "_symlink_upload_wait_before_next_try_in_seconds",  # set in __init__
    ),
    # data/text_dataset.py: background shard threads that fail are reported, not hung on.
    "streaming.base.dataset:StreamingDataset": (
        "_prepare_thread",
        "_ready_thread",
        "_event",  # set when iteration starts
        "_shard_states",  # set in __init__: a shard whose hash failed is marked remote again
    ),
    "streaming.base.dataset": ("_ShardState",),
    # export/checkpoint.py: reads chosen keys of a sharded (DCP) checkpoint without a process
    # group.
    "torch.distributed.checkpoint.state_dict_loader": ("_load_state_dict_from_keys",),
    # train/gloo_average.py: on a torch without FSDP2's force-sum switch (2.7), gloo groups get
    # FSDP2's divide factors wrapped so that a sum is divided once.
    "torch.distributed.fsdp._fully_shard": ("_fsdp_collectives",),
    "torch.distributed.fsdp._fully_shard._fsdp_collectives": ("_get_gradient_divide_factors",),
    # train/fp8.py: checkpoints of FP8 runs hold the plain high-precision weights.
    "torch.nn:Module": ("_register_state_dict_hook",),
}
# Names above that exist only on instances (the test builds one of each to check them).
INSTANCE_ATTRIBUTES = frozenset(
    {"_symlink_upload_wait_before_next_try_in_seconds", "_event", "_shard_states"}
)


def _major_minor(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text)
    if m is None:
        raise ValueError(f"not a version: {text!r}")
    return int(m.group(1)), int(m.group(2))


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch: the one question every version shim asks."""
    import torch

    return _major_minor(torch.__version__)


# Arguments mpt-train passes by name to torch APIs whose signatures moved between releases
# (FlexAttention's masks, FSDP2's hooks): "module:Object[.method]" -> names.
TORCH_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "torch.nn.attention.flex_attention:create_block_mask": (
        "mask_mod", "B", "H", "Q_LEN", "KV_LEN", "device",
    ),
    "torch.nn.attention.flex_attention:BlockMask.from_kv_blocks": (
        "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "BLOCK_SIZE",
        "mask_mod", "seq_lengths",
    ),
    "torch.nn.attention.flex_attention:flex_attention": (
        "score_mod", "block_mask", "scale", "enable_gqa", "kernel_options",
    ),
    "torch.distributed.fsdp:FSDPModule.set_all_reduce_hook": ("hook",),
}  # fmt: skip


@functools.cache
def flex_attention_trains_on_cpu() -> bool:
    """Whether the installed torch runs FlexAttention's backward on CPU tensors.

    torch 2.7 runs it (eagerly, unfused); torch 2.11 refuses any CPU input that needs a
    gradient (``NotImplementedError``), so on such a torch FlexAttention trains on GPUs only.
    Asked once per process with a one-block call.
    """
    import torch

    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return False
    q = torch.zeros(1, 1, 16, 8, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError:
        return False
    return True


def _class(path: str) -> object:
    module, _, name = path.partition(":")
    obj: object = importlib.import_module(module)
    for part in filter(None, name.split(".")):
        obj = getattr(obj, part)
    return obj


def missing_torch_arguments() -> list[str]:
    """``module:Object(name)`` for each listed argument the installed torch does not take."""
    import inspect

    missing = []
    for path, names in TORCH_ARGUMENTS.items():
        params = inspect.signature(_class(path)).parameters  # type: ignore[arg-type]
        missing += [f"{path}({n})" for n in names if n not in params]
    return missing


def missing_private_attributes() -> list[str]:
    """``module:Class.name`` for each listed class-level private attribute that is gone."""
    missing = []
    for path, names in PRIVATE_ATTRIBUTES.items():
        cls = _class(path)
        missing += [
            f"{path}.{n}" for n in names if n not in INSTANCE_ATTRIBUTES and not hasattr(cls, n)
        ]
    return missing


def read_lock(path: Path) -> dict[str, str]:
    """``{package: version}`` of a ``uv pip compile`` lock file (names normalised)."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if m:
            pins[_normalise(m.group(1))] = m.group(2)
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@dataclass
class StackInfo:
    """The installed versions a figure depends on; ``name`` is the named stack they match."""

    torch: str
    composer: str | None
    streaming: str | None
    torchvision: str | None
    torchao: str | None
    cuda: str | None
    cudnn: str | None
    gpu: str | None
    python: str
    name: str | None

    def record(self) -> dict[str, str | None]:
        """The ``stack`` object of a benchmark record."""
        keys = ("torch", "composer", "streaming", "cuda", "cudnn", "python", "name")
        return {k: getattr(self, k) for k in keys}


def _cudnn_version(number: int | None) -> str | None:
    """cuDNN's version number as text: 9 counts 91900 for 9.19.0, 8 counts 8902 for 8.9.2."""
    if not number:
        return None
    if number >= 90000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def matching_stack(stacks_dir: Path = STACKS_DIR) -> tuple[str | None, list[str]]:
    """(the named stack whose core pins equal the installed versions, differences per stack).

    torch is compared without its local build tag: ``2.11.0+cu130`` is torch 2.11.0.
    """
    differences = []
    for name in STACK_NAMES:
        lock = stacks_dir / f"{name}.txt"
        if not lock.is_file():
            differences.append(f"{name}: no lock file {lock}")
            continue
        pins = read_lock(lock)
        diff = []
        for pkg in CORE_PACKAGES:
            have = _installed(pkg)
            have = have.split("+")[0] if have else None
            if have != pins.get(pkg):
                diff.append(f"{pkg} {have or 'not installed'} (locked {pins.get(pkg)})")
        if not diff:
            return name, []
        differences.append(f"{name}: " + ", ".join(diff))
    return None, differences


def installed_stack(stacks_dir: Path = STACKS_DIR) -> StackInfo:
    """What is installed, and the named stack it matches (None when it matches none)."""
    import torch

    cuda = cudnn = gpu = None
    if torch.cuda.is_available():
        cuda = torch.version.cuda
        cudnn = _cudnn_version(torch.backends.cudnn.version())
        gpu = torch.cuda.get_device_name()
    name, _ = matching_stack(stacks_dir)
    return StackInfo(
        torch=torch.__version__,
        composer=_installed("mosaicml"),
        streaming=_installed("mosaicml-streaming"),
        torchvision=_installed("torchvision"),
        torchao=_installed("torchao"),
        cuda=cuda,
        cudnn=cudnn,
        gpu=gpu,
        python=platform.python_version(),
        name=name,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The installed stack and the one it matches.")
    parser.add_argument("--stack", action="store_true", help="print the stack (the default)")
    parser.add_argument("--json", action="store_true", help="the record's stack object")
    parser.add_argument("--name", action="store_true", help="the matching stack's name only")
    parser.add_argument("--stacks-dir", type=Path, default=STACKS_DIR)
    args = parser.parse_args(argv)
    info = installed_stack(args.stacks_dir)
    if args.name:  # nothing, and exit status 1, when no named stack matches
        print(info.name or "")
        return 0 if info.name else 1
    if args.json:
        print(json.dumps(info.record(), sort_keys=True))
        return 0
    for key in ("torch", "composer", "streaming", "torchvision", "torchao", "cuda", "cudnn"):
        print(f"{key:12s} {getattr(info, key) or '-'}")
    print(f"{'gpu':12s} {info.gpu or 'none visible'}")
    print(f"{'python':12s} {info.python}")
    if info.name:
        print(f"stack        {info.name} (stacks/{info.name}.txt)")
    else:
        print("stack        none of the named stacks:")
        for line in matching_stack(args.stacks_dir)[1]:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
