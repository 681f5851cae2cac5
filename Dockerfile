# megatron-minitron on an NGC PyTorch container (CUDA, cuDNN, NCCL, Transformer Engine, Apex and a tuned
# torch come from the image; we add megatron-core and this package without touching torch).
#   docker build -t megatron-minitron:latest .                    # or --build-arg NGC_TAG=25.10
#   enroot import -o megatron-minitron.sqsh dockerd://megatron-minitron:latest   # for pyxis (slurm/*.sh)
# torch >= 2.9 (NGC 25.10 or later) is needed for torchrun to forward SIGUSR1 (see docs/launch.md).
ARG NGC_TAG=25.11
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/megatron-minitron

# Freeze what the image ships (torch and its CUDA-built companions) so that no install below can
# replace them; pip fails instead of silently downloading another torch.
RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|numpy|transformer[-_]engine|apex|flash[-_]attn)==' \
      > /opt/image-constraints.txt \
 && cat /opt/image-constraints.txt

# megatron-core: --no-deps because its requirements (torch, numpy, packaging) are already in the image. The
# 0.16 line until the GPU tests have run on 0.17-0.19 (setup.py allows them; README: megatron-core versions).
RUN pip install --no-deps -c /opt/image-constraints.txt "megatron-core>=0.16,<0.17"

# The package itself without dependencies, then only the pure-Python ones the image may lack.
COPY setup.py ./
COPY megatron_minitron ./megatron_minitron
RUN pip install --no-deps --no-build-isolation . \
 && pip install -c /opt/image-constraints.txt pyyaml tqdm psutil sentencepiece packaging xxhash \
      "transformers>=4.45" safetensors tokenizers

# Launch scripts and example configs (slurm/*.sh mount the submitting checkout instead when REPO_DIR is set).
COPY launch ./launch
COPY slurm ./slurm
COPY examples ./examples

RUN python -c "import torch, megatron.core, megatron_minitron; print('torch', torch.__version__, \
'megatron-core', megatron.core.__version__)" \
 && minitron --help > /dev/null
