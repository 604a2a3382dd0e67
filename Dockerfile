# mpt-train GPU image: the pinned stack of pyproject.toml on PyTorch 2.7.0 / CUDA 12.6, with
# flash-attn compiled for Ampere (A100, sm80) and Hopper (H100/H200, sm90).
#
#   docker build -t mpt-train .                      # flash-attn compiles: ~20-40 min, 16+ cores
#   docker run --gpus all --ipc=host -v /data:/data mpt-train \
#       -n 8 train.py yamls/mpt-125m.yaml variables.data_remote=/data/mds
#   docker run --gpus all --ipc=host --network=host mpt-train \
#       --world_size 16 --node_rank 0 --master_addr host0 --master_port 29500 -n 8 \
#       train.py yamls/mpt-7b.yaml                   # one container per node
#
# Keep every pin equal to pyproject.toml's: `make lint` (scripts/lint_dockerfile.py) checks it.
FROM pytorch/pytorch:2.7.0-cuda12.6-cudnn9-devel

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    MAX_JOBS=8

# flash-attn first: the slowest layer, it changes only with torch or its own pin. It builds
# against the image's torch (no build isolation); MAX_JOBS bounds the compiler's memory use.
RUN pip install --no-cache-dir ninja==1.11.1.4 packaging==25.0 wheel==0.45.1 \
    && pip install --no-cache-dir --no-build-isolation flash-attn==2.7.4.post1

# The runtime stack, pinned as in pyproject.toml (torch and torchvision are the image's own).
RUN pip install --no-cache-dir \
        torch==2.7.0 \
        torchvision==0.22.0 \
        torchao==0.11.0 \
        mosaicml==0.32.1 \
        mosaicml-streaming==0.13.0 \
        numpy==2.1.3 \
        transformers==4.57.6 \
        "tokenizers>=0.21,<0.23" \
        "safetensors>=0.4" \
        omegaconf==2.4.0 \
        wandb==0.28.2 \
        "tqdm>=4.66" \
        "datasets>=3" \
        "matplotlib>=3.8" \
        nvidia-cudnn-frontend==1.16.0

WORKDIR /workspace/mpt-train
COPY --chown=1000:1000 pyproject.toml README.md train.py ./
COPY --chown=1000:1000 mpt_train ./mpt_train
COPY --chown=1000:1000 yamls ./yamls
COPY --chown=1000:1000 scripts ./scripts
# Dependencies are already satisfied above: this installs the package itself (a local path,
# which DL3013's "pin it" cannot apply to). Training does not need root: it runs as uid 1000,
# so files written to mounted volumes are not root's.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps ".[gpu]" \
    && useradd --create-home --uid 1000 mpt \
    && chown 1000:1000 /workspace/mpt-train
USER 1000

# `composer` is Composer's launcher: `-n` defaults to the visible GPU count.
ENTRYPOINT ["composer"]
# Default: the quickstart (prepares the shipped corpus, trains a tiny MPT); pass your own
# `train.py SPEC ...` to train for real.
CMD ["-n", "1", "-m", "mpt_train.tools.quickstart"]
