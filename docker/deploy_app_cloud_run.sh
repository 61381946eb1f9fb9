#!/usr/bin/env bash
# Build the pathologist's page (docker/app/Dockerfile), push it and deploy it on Cloud Run next to the
# scoring service (docker/deploy_cloud_run.sh first), private like it:
#   PROJECT=my-project REGION=europe-west4 bash docker/deploy_app_cloud_run.sh
# The page calls the scoring service with its own service account's identity token: that account gets
# roles/run.invoker on the scoring service. Give the lab access with INVOKER, or put IAP in front.
set -euo pipefail
: "${PROJECT:?set PROJECT to your Google Cloud project id}"
REGION=${REGION:-europe-west4}
REPO=${REPO:-histoflow}
SCORING_SERVICE=${SCORING_SERVICE:-histoflow}
SERVICE=${SERVICE:-histoflow-app}
TAG=${TAG:-$(date +%Y%m%d-%H%M%S)}
INVOKER=${INVOKER:-}                        # e.g. group:pathology-lab@example.org
ACCOUNT=${ACCOUNT:-$SERVICE-sa@$PROJECT.iam.gserviceaccount.com}
IMAGE="$REGION-docker.pkg.dev/$PROJECT/$REPO/$SERVICE:$TAG"

cd "$(dirname "$0")/.."
docker build -f docker/app/Dockerfile -t "$IMAGE" .
gcloud auth configure-docker "$REGION-docker.pkg.dev" --quiet
docker push "$IMAGE"

gcloud iam service-accounts describe "$ACCOUNT" --project "$PROJECT" >/dev/null 2>&1 ||
  gcloud iam service-accounts create "${ACCOUNT%%@*}" --project "$PROJECT" --display-name "histoflow page"
gcloud run services add-iam-policy-binding "$SCORING_SERVICE" --project "$PROJECT" --region "$REGION" \
  --member "serviceAccount:$ACCOUNT" --role roles/run.invoker
SCORING_URL=$(gcloud run services describe "$SCORING_SERVICE" --project "$PROJECT" --region "$REGION" \
  --format 'value(status.url)')/invocations

# The page itself is light (no model): 1 vCPU, 1 GiB; uploads up to 32 MiB per request on Cloud Run.
gcloud run deploy "$SERVICE" \
  --project "$PROJECT" --region "$REGION" --image "$IMAGE" --service-account "$ACCOUNT" \
  --port 8080 --cpu 1 --memory 1Gi --concurrency 20 --min-instances 0 --max-instances 3 --timeout 300 \
  --set-env-vars "SCORING_URL=$SCORING_URL" \
  --no-allow-unauthenticated

if [[ -n "$INVOKER" ]]; then
  gcloud run services add-iam-policy-binding "$SERVICE" --project "$PROJECT" --region "$REGION" \
    --member "$INVOKER" --role roles/run.invoker
fi
echo "page: $(gcloud run services describe "$SERVICE" --project "$PROJECT" --region "$REGION" --format 'value(status.url)')"
