#!/usr/bin/env bash
# Build the serving image of the registered champion with MLflow (needs a Docker engine and the internet):
#   bash docker/build.sh [MODEL_URI] [IMAGE]
# Then: docker run --rm -p 8080:8080 -e MLFLOW_MODELS_WORKERS=2 histoflow   (serves /ping and /invocations)
# EXPLAIN=1: with TensorFlow and Keras, so that `explain` (Grad-CAM) answers (see generate_dockerfile.sh).
set -euo pipefail
MODEL_URI=${1:-${MODEL_URI:-models:/histoflow@champion}}
IMAGE=${2:-${IMAGE:-histoflow}}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
if [[ "${EXPLAIN:-0}" == 1 ]]; then
  context=$(mktemp -d)
  trap 'rm -rf "$context"' EXIT
  bash "$(dirname "$0")/generate_dockerfile.sh" "$MODEL_URI" "$context/build"
  docker build -t "$IMAGE" "$context/build"
else
  mlflow models build-docker -m "$MODEL_URI" -n "$IMAGE" --env-manager local
fi
