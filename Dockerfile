# The serving image: `docker run IMAGE serve` (what SageMaker runs) validates /opt/ml/model,
# warms up, then starts multi-model-server on $SAGEMAKER_BIND_TO_PORT (default 8080).
# BASE_IMAGE must be Debian bookworm (its python3 is 3.11); on a machine that reaches no
# registry, it must already exist locally.
ARG BASE_IMAGE=debian:bookworm-slim

# Stage 1: a Java runtime cut down to the modules MMS's frontend uses (jdeps on model-server.jar):
# 50 MB instead of the ~270 MB that openjdk-17-jre-headless and its libraries add.
FROM ${BASE_IMAGE} AS jre
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jdk-headless \
    && jlink --output /opt/jre --strip-java-debug-attributes --no-man-pages --no-header-files --compress=2 \
        --add-modules java.base,java.compiler,java.desktop,java.logging,java.management,java.naming,java.rmi,java.scripting,java.sql,java.xml,jdk.sctp,jdk.unsupported

# Stage 2: the serving image (same base; no JDK, no compilers).
FROM ${BASE_IMAGE}

LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true

# Every wheel in requirements/serve.txt is prebuilt: no compilers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
COPY --from=jre /opt/jre /opt/jre

# Dependencies in their own layer, before any code, so a code change rebuilds in seconds.
COPY requirements/serve.txt /tmp/serve.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/serve.txt \
    && rm /tmp/serve.txt

# `serve` keeps MMS's config, logs and sockets in a temporary folder: an unprivileged user with
# a home is all it needs, and the model mount can be read-only.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/model-server model-server

ENV PATH=/opt/venv/bin:/opt/jre/bin:$PATH \
    JAVA_HOME=/opt/jre \
    PYTHONPATH=/opt/program/code \
    OMP_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# The code is importable from PYTHONPATH rather than pip-installed: nothing to build, and this
# layer is the only one a code change invalidates.
COPY code/ /opt/program/code/
COPY container/ /opt/program/container/

USER model-server
WORKDIR /home/model-server
EXPOSE 8080

# SageMaker runs `docker run IMAGE serve`; anything else is a mistake worth a clear message.
ENTRYPOINT ["/bin/sh", "-c", "if [ \"$#\" -eq 1 ] && [ \"$1\" = serve ]; then exec python /opt/program/container/serve; fi; echo \"usage: docker run IMAGE serve (got: $*)\" >&2; exit 2", "entrypoint"]
CMD ["serve"]
