#!/usr/bin/env bash
# Push the serving image to Artifact Registry and deploy it on Cloud Run, private (IAM-authenticated).
#   PROJECT=my-project REGION=europe-west4 bash docker/deploy_cloud_run.sh
# Prerequisites: gcloud auth login; the image built by docker/build.sh (tag histoflow).
set -euo pipefail
: "${PROJECT:?set PROJECT to your Google Cloud project id}"
REGION=${REGION:-europe-west4}
REPO=${REPO:-histoflow}                     # Artifact Registry repository (Docker format)
SERVICE=${SERVICE:-histoflow}
TAG=${TAG:-$(date +%Y%m%d-%H%M%S)}
INVOKER=${INVOKER:-}                        # e.g. serviceAccount:lab-client@my-project.iam.gserviceaccount.com
IMAGE="$REGION-docker.pkg.dev/$PROJECT/$REPO/$SERVICE:$TAG"

gcloud services enable run.googleapis.com artifactregistry.googleapis.com --project "$PROJECT"
gcloud artifacts repositories describe "$REPO" --location "$REGION" --project "$PROJECT" >/dev/null 2>&1 ||
  gcloud artifacts repositories create "$REPO" --repository-format docker --location "$REGION" --project "$PROJECT"
gcloud auth configure-docker "$REGION-docker.pkg.dev" --quiet
docker tag histoflow "$IMAGE"
docker push "$IMAGE"

# From the measurements (docs/benchmarks.md): a model on ONNX Runtime on 2 vCPU, 2 scoring workers (one per
# core; each holds the model), 1.3-1.5 GiB at peak for both: 2Gi (MEMORY=4Gi for an image built with EXPLAIN=1,
# which holds TensorFlow: 2.7 GiB). Throughput per worker saturates from 2-4 requests in flight, beyond which
# latency only queues: 8 per instance, then Cloud Run adds instances. A new instance answers 2.5-2.9 s after its
# command starts, plus the image pull (TensorFlow took 5.3-5.8 s, its image 1.2 GiB more), so it scales to zero by
# default (MIN_INSTANCES=1 keeps one warm, billed); CPU boost shortens that start. /ping is the startup and
# liveness probe (the image's nginx listens on 8080 and proxies /ping and /invocations to the scoring server).
MEMORY=${MEMORY:-2Gi}
MIN_INSTANCES=${MIN_INSTANCES:-0}
gcloud run deploy "$SERVICE" \
  --project "$PROJECT" --region "$REGION" --image "$IMAGE" \
  --port 8080 --cpu 2 --memory "$MEMORY" --concurrency 8 --min-instances "$MIN_INSTANCES" --max-instances 10 \
  --cpu-boost --timeout 60 \
  --set-env-vars MLFLOW_MODELS_WORKERS=2,MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=55,TF_CPP_MIN_LOG_LEVEL=2 \
  --startup-probe httpGet.path=/ping,httpGet.port=8080,initialDelaySeconds=0,periodSeconds=2,timeoutSeconds=2,failureThreshold=60 \
  --liveness-probe httpGet.path=/ping,httpGet.port=8080,periodSeconds=30,timeoutSeconds=5,failureThreshold=3 \
  --no-allow-unauthenticated

if [[ -n "$INVOKER" ]]; then
  gcloud run services add-iam-policy-binding "$SERVICE" --project "$PROJECT" --region "$REGION" \
    --member "$INVOKER" --role roles/run.invoker
fi

URL=$(gcloud run services describe "$SERVICE" --project "$PROJECT" --region "$REGION" --format 'value(status.url)')
cat <<MSG
Deployed $IMAGE at $URL (private). Call it with an identity token:
  curl -H "Authorization: Bearer \$(gcloud auth print-identity-token)" -H 'Content-Type: application/json' \\
       -d "{\"inputs\": {\"image\": [\"\$(base64 -w0 slide.png)\"]}}" $URL/invocations
MSG
