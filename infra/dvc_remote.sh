#!/usr/bin/env bash
# Point this repository's DVC remote at S3 (AWS, SeaweedFS, MinIO, R2).
#
#   infra/dvc_remote.sh [URL] [ENDPOINT]     defaults: s3://lcmlora-dvc/cache and $AWS_ENDPOINT_URL
#   dvc push / dvc pull
#
# The remote URL and endpoint go into .dvc/config (shared through git); credentials never do:
# DVC reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile at run time.
set -euo pipefail
URL="${1:-s3://lcmlora-dvc/cache}"
ENDPOINT="${2:-${AWS_ENDPOINT_URL:-}}"
cd "$(dirname "$0")/.."
DVC="dvc"; command -v dvc >/dev/null || DVC=".venv/bin/dvc"
[ -d .dvc ] || "$DVC" init -q
"$DVC" remote add --default --force s3 "$URL"
if [ -n "$ENDPOINT" ]; then
  "$DVC" remote modify s3 endpointurl "$ENDPOINT"
fi
echo "dvc_remote.sh: default remote 's3' -> $URL${ENDPOINT:+ (endpoint $ENDPOINT)}"
