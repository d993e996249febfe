# The image of one app (trainer or exporter; CPU or CUDA 12): its Pants-built PEX, unpacked at
# build time into a virtualenv, on Debian's Python 3.11. The CPU and GPU images differ only in the
# PEX (the cpu or cuda12 resolve): CUDA comes from jax[cuda12]'s wheels, so a GPU host needs only
# the NVIDIA driver. BASE_IMAGE is any Debian bookworm with python3: the public
# python:3.11-slim-bookworm by default, one made locally by build-support/install-container-tools.sh
# where no registry is reachable.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG PEX=apps.trainer/trainer.pex
# RTDLM_VERSION: "dev" locally, the release on a version tag, "main" from main (publish.yml).
ARG RTDLM_VERSION=dev
ARG RTDLM_GIT_REVISION=unknown
ARG COMMAND=trainer
LABEL org.opencontainers.image.title="rt-dlm ${COMMAND}" \
      org.opencontainers.image.description="RT-DLM ${COMMAND}: decoder-only language models on JAX" \
      org.opencontainers.image.source="https://github.com/auralithai/rt-dlm" \
      org.opencontainers.image.version="${RTDLM_VERSION}" \
      org.opencontainers.image.revision="${RTDLM_GIT_REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid/gid, so volume ownership and Kubernetes' runAsUser agree everywhere.
RUN groupadd --gid 10001 rtdlm \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /runs --shell /usr/sbin/nologin rtdlm \
    && mkdir -p /runs \
    && chown rtdlm:rtdlm /runs
# The PEX becomes a compiled virtualenv, so nothing unpacks at run time (the root filesystem can
# be read-only). It is mounted from the build context, not copied: neither it nor pex's cache
# lands in a layer, and no second stage copies the (GPU: ~7 GB) virtualenv again.
RUN --mount=type=bind,target=/tmp/context \
    PEX_TOOLS=1 PEX_ROOT=/tmp/pex-root python3 "/tmp/context/${PEX}" venv --compile \
        --bin-path prepend /opt/rtdlm/venv \
    && rm -rf /tmp/pex-root
# NVIDIA_*: what the NVIDIA container runtime mounts from the host driver (ignored without one).
ENV PATH=/opt/rtdlm/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RTDLM_GIT_REVISION=${RTDLM_GIT_REVISION}
USER 10001:10001
WORKDIR /runs
VOLUME ["/runs"]
EXPOSE 8000
ENTRYPOINT ["/opt/rtdlm/venv/pex"]
CMD ["--help"]
