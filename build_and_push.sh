#!/usr/bin/env bash
# Build the serving image, tag it with the git sha and `latest`, and push both to Amazon ECR.
#
#   ./build_and_push.sh [IMAGE_NAME] [--region REGION] [--dry-run]
#
# IMAGE_NAME defaults to twostage-rec (also the ECR repository name). The region comes from
# --region, else AWS_REGION / AWS_DEFAULT_REGION, else `aws configure get region`.
# --dry-run prints every command and runs none: no AWS call, no docker call. Its account is
# $AWS_ACCOUNT_ID or the placeholder 123456789012.
# Environment: BASE_IMAGE (passed as a build argument when set), AWS_CLI / DOCKER_CLI (the
# executables, default aws / docker).
set -euo pipefail

usage() {
  echo "usage: $0 [IMAGE_NAME] [--region REGION] [--dry-run]" >&2
  exit "${1:-2}"
}

image=twostage-rec
region=""
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --region) [ $# -ge 2 ] || usage; region=$2; shift 2 ;;
    --region=*) region=${1#--region=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    -*) echo "build_and_push.sh: unknown option $1" >&2; usage ;;
    *) image=$1; shift ;;
  esac
done

aws=${AWS_CLI:-aws}
docker=${DOCKER_CLI:-docker}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# A command quoted for printing: the dry run's lines can be copy-pasted.
q() { printf '%q ' "$@" | sed 's/ $//'; }

# Print a command (dry run) or run it.
run() {
  if [ "$dry_run" = 1 ]; then q "$@"; echo; else "$@"; fi
}

have_aws() { command -v "$aws" >/dev/null 2>&1; }

if [ -z "$region" ]; then
  region=${AWS_REGION:-${AWS_DEFAULT_REGION:-}}
fi
if [ -z "$region" ] && have_aws; then
  region=$("$aws" configure get region 2>/dev/null || true)  # reads ~/.aws/config, no AWS call
fi
if [ -z "$region" ]; then
  if [ "$dry_run" = 1 ]; then
    region=us-east-1
    echo "# no region configured; the dry run uses $region"
  else
    echo "build_and_push.sh: no region; pass --region or set AWS_REGION" >&2
    exit 2
  fi
fi

if [ "$dry_run" = 1 ]; then
  echo "# dry run: nothing below is executed"
  run "$aws" sts get-caller-identity --query Account --output text
  account=${AWS_ACCOUNT_ID:-123456789012}
else
  have_aws || { echo "build_and_push.sh: the aws CLI ($aws) is not installed" >&2; exit 1; }
  account=$("$aws" sts get-caller-identity --query Account --output text)
fi

# A tree with uncommitted changes must not pass for the commit it started from.
sha=$(git -C "$root" rev-parse --short HEAD 2>/dev/null) \
  || { echo "build_and_push.sh: $root is not a git checkout; the image tag is the commit sha" >&2; exit 1; }
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
  sha="$sha-dirty"
fi
registry="$account.dkr.ecr.$region.amazonaws.com"
repository="$registry/$image"

describe=("$aws" ecr describe-repositories --repository-names "$image" --region "$region")
create=("$aws" ecr create-repository --repository-name "$image" --region "$region"
  --image-scanning-configuration scanOnPush=true)
password=("$aws" ecr get-login-password --region "$region")
login=("$docker" login --username AWS --password-stdin "$registry")
if [ "$dry_run" = 1 ]; then
  echo "$(q "${describe[@]}") >/dev/null || $(q "${create[@]}")"
  echo "$(q "${password[@]}") | $(q "${login[@]}")"
else
  "${describe[@]}" >/dev/null 2>&1 || "${create[@]}" >/dev/null
  "${password[@]}" | "${login[@]}"
fi

build_args=()
if [ -n "${BASE_IMAGE:-}" ]; then
  build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi
build=("$docker" build ${build_args[@]+"${build_args[@]}"}
  -t "$repository:$sha" -t "$repository:latest" -f "$root/Dockerfile" "$root")
if [ "$dry_run" = 1 ]; then
  echo "DOCKER_BUILDKIT=1 $(q "${build[@]}")"
else
  DOCKER_BUILDKIT=1 "${build[@]}"
fi
run "$docker" push "$repository:$sha"
run "$docker" push "$repository:latest"
if [ "$dry_run" = 0 ]; then
  echo "pushed $repository:$sha"
fi
