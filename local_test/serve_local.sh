#!/usr/bin/env bash
# Serve a model directory with the serving image, as SageMaker would, on http://127.0.0.1:$PORT.
#
#   local_test/serve_local.sh MODEL_DIR [IMAGE]      (IMAGE defaults to twostage-rec:latest)
#
# PORT (default 8080) is the host port. These variables are passed to the container when set:
# FEATURE_SOURCE FEATURE_GROUP_NAME FEATURE_STORE_ENDPOINT_URL AWS_REGION AWS_DEFAULT_REGION
# AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN UNKNOWN_USER_POLICY MAX_REQUEST_BYTES
# MAX_BATCH_SIZE SAGEMAKER_MODEL_SERVER_WORKERS SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS.
# The host is reachable from the container as host.docker.internal (see local_test/README.md).
# Ctrl-C stops the container.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 MODEL_DIR [IMAGE]" >&2
  exit 2
fi
if [ ! -d "$1" ]; then
  echo "serve_local.sh: $1: no such model directory" >&2
  exit 2
fi
model_dir=$(cd "$1" && pwd)  # docker -v needs an absolute path
image=${2:-twostage-rec:latest}
docker=${DOCKER_CLI:-docker}

# The image runs as an unprivileged user: the model must be readable by others.
unreadable=$(find "$model_dir" \( -type d ! -perm -o=rx \) -o \( -type f ! -perm -o=r \) | head -1)
if [ -n "$unreadable" ]; then
  echo "serve_local.sh: $unreadable is not readable by other users, and the container does not" \
    "run as you; run: chmod -R a+rX $model_dir" >&2
  exit 2
fi

env_args=()
for name in FEATURE_SOURCE FEATURE_GROUP_NAME FEATURE_STORE_ENDPOINT_URL AWS_REGION AWS_DEFAULT_REGION \
  AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN UNKNOWN_USER_POLICY MAX_REQUEST_BYTES \
  MAX_BATCH_SIZE SAGEMAKER_MODEL_SERVER_WORKERS SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS; do
  # `-e NAME` without a value copies the variable only when it is set here.
  env_args+=(-e "$name")
done

name=twostage-rec-local-${PORT:-8080}
echo "serving $model_dir with $image on http://127.0.0.1:${PORT:-8080} as container $name (Ctrl-C stops it)" >&2
exec "$docker" run --rm --name "$name" \
  -v "$model_dir:/opt/ml/model:ro" \
  -p "127.0.0.1:${PORT:-8080}:8080" \
  --add-host=host.docker.internal:host-gateway \
  "${env_args[@]}" \
  "$image" serve
