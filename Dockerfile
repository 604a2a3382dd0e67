# mpt-train GPU image, on either named stack (docs/development.md, "Stacks"):
#   STACK=pinned  (default) Composer's declared set: PyTorch 2.7.0 / CUDA 12.6, with flash-attn
#                 compiled for Ampere (A100, sm80) and Hopper (H100/H200, sm90);
#   STACK=current PyTorch 2.11.0 / CUDA 13.0 with Composer 0.32.1 over its torch bound: the
#                 stack the published GPU figures were measured on (FlexAttention and cuDNN
#                 attention; flash-attn 2.7.4 is not built for it).
# Both install their lock file, stacks/$STACK.txt, with uv over the base image's torch.
#
#   docker build -t mpt-train .                      # flash-attn compiles: ~20-40 min, 16+ cores
#   docker build --build-arg STACK=current -t mpt-train:current .
#   docker run --gpus all --ipc=host -v /data:/data mpt-train \
#       -n 8 train.py yamls/mpt-125m.yaml variables.data_remote=/data/mds
#   docker run --gpus all --ipc=host --network=host mpt-train \
#       --world_size 16 --node_rank 0 --master_addr host0 --master_port 29500 -n 8 \
#       train.py yamls/mpt-7b.yaml                   # one container per node
#
# Each stack's base image carries its lock's torch, and every pin of pyproject.toml is in both
# locks: `make lint` (scripts/lint_dockerfile.py, scripts/check_locks.py) checks it.
ARG STACK=pinned

FROM pytorch/pytorch:2.7.0-cuda12.6-cudnn9-devel AS base-pinned
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    MAX_JOBS=8
# flash-attn first: the slowest layer, it changes only with torch or its own pin. It builds
# against the image's torch (no build isolation); MAX_JOBS bounds the compiler's memory use.
RUN pip install --no-cache-dir ninja==1.11.1.4 packaging==25.0 wheel==0.45.1 \
    && pip install --no-cache-dir --no-build-isolation flash-attn==2.7.4.post1

FROM pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel AS base-current

# The stage the build argument names (BuildKit builds only the stages it needs).
# hadolint ignore=DL3006
FROM base-${STACK}
ARG STACK
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The runtime stack: the lock, exactly (it holds every transitive pin, so nothing else is
# resolved; torch is the image's own, which the lock's torch pin matches).
WORKDIR /workspace/mpt-train
COPY stacks ./stacks
RUN pip install --no-cache-dir uv==0.13.8 \
    && uv pip install --system --no-cache --no-deps -r "stacks/${STACK}.txt" \
        nvidia-cudnn-frontend==1.16.0

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
