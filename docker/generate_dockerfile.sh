#!/usr/bin/env bash
# Write the serving image's build context (Dockerfile + the model baked in) with MLflow's own generator:
#   bash docker/generate_dockerfile.sh [MODEL_URI] [OUTPUT_DIR]
# Defaults: models:/histoflow@champion, docker/build. Needs MLFLOW_TRACKING_URI pointing at the registry
# (default: the local sqlite:///mlflow.db). Works offline; `docker build` of the result needs the internet.
# EXPLAIN=1 adds TensorFlow and Keras to the image (~1.3 GB more) so that `explain` (Grad-CAM) answers: an ONNX
# model scores without them and answers explain with HTTP 501 where they are missing. The page's scoring
# service needs it (docker/README.md).
set -euo pipefail
MODEL_URI=${1:-${MODEL_URI:-models:/histoflow@champion}}
OUT=${2:-${OUT:-docker/build}}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
rm -rf "$OUT"
# env-manager local: the model's pinned requirements are pip-installed into the image's Python.
mlflow models generate-dockerfile -m "$MODEL_URI" -d "$OUT" --env-manager local
if [[ "${EXPLAIN:-0}" == 1 ]]; then
  { echo; python -c "from histoflow.serving.packaging import explain_requirements as r; print(*r(), sep='\n')"; } \
    >> "$OUT/model_dir/requirements.txt"
fi
echo "build context in $OUT: docker build -t histoflow $OUT"
