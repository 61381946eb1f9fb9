#!/usr/bin/env bash
# Reproduce docs/results.md: every variant on the developer sets, patient split, plus leaky image splits.
# Usage (from the repository root, venv active):
#   bash docs/reproduce_results.sh [breakhis|densenet-breakhis|idc|densenet-idc|cv-breakhis|cv-idc|cv-densenet-breakhis|cv-densenet-idc|tune-densenet-breakhis|tune-densenet-idc|finetune-densenet-breakhis|finetune-densenet-idc|ensemble-densenet-idc|ensemble-idc|thresholds|compare|all]
# (runs go to $MLFLOW_TRACKING_URI, default ./mlflow.db)
set -euo pipefail
SHARED=${SHARED:-../shared}
export KERAS_HOME=${KERAS_HOME:-$PWD/.keras-home}      # MobileNet ImageNet weights, offline
# MobileNet only: the DenseNet121 file is passed by path (its bytes fail the MD5 Keras checks in its folder).
mkdir -p "$KERAS_HOME/models" && cp -n "$SHARED"/keras-weights/mobilenet*.h5 "$KERAS_HOME/models/"
run() { mlflow run . --env-manager local "$@"; }
BH="-P data_dir=$SHARED/data/breakhis"
IDC="-P data_dir=$SHARED/data/idc -P image_size=50"   # IDC patches are 50x50: no upsampling
what=${1:-all}
is() { [[ $what == "$1" || $what == all ]]; }

if is breakhis; then
  for e in baseline augmented transfer; do run -e $e --experiment-name results-breakhis $BH; done
  run -e baseline --experiment-name results-breakhis $BH -P split=image
  run -e transfer --experiment-name results-breakhis $BH -P split=image
fi
# No DenseNet121 ImageNet weights offline: trained from scratch, with fewer epochs on 2 CPU cores.
if is densenet-breakhis; then
  run -e densenet --experiment-name results-breakhis-densenet $BH -P weights=none -P epochs=10
fi
# IDC: 6,000+ training patches; epochs capped so the whole section fits in about an hour on 2 CPU cores
# (EarlyStopping usually stops the CNNs earlier; the cap is in each run's params).
if is idc; then
  run -e baseline --experiment-name results-idc $IDC -P epochs=20
  run -e augmented --experiment-name results-idc $IDC -P epochs=12
  run -e transfer --experiment-name results-idc $IDC -P epochs=12
  run -e baseline --experiment-name results-idc $IDC -P epochs=20 -P split=image
fi
if is densenet-idc; then
  run -e densenet --experiment-name results-idc-densenet $IDC -P weights=none -P epochs=12
fi
# 5-fold patient cross-validation (StratifiedGroupKFold, seed 42): the same folds for every run of a set,
# so that compare pairs them (paired patient bootstrap). Capped for 2 CPU cores: 96 px, at most 15 epochs,
# MobileNet frozen (ImageNet features, the fusion head trained at 1e-3: a fine-tuned fold took 15 epochs
# and ~4 min on a quiet machine and was still improving at the cap).
MOBILENET="-P variant=transfer -P backbone=mobilenet -P alpha=0.75 -P weights=imagenet -P unfrozen_blocks=0 -P learning_rate=1e-3"
CV="-e cv -P folds=5 -P epochs=15 -P patience=4 -P lr_patience=2 -P gradcam_per_class=1"
if is cv-breakhis; then
  X="--experiment-name results-cv-breakhis $BH -P image_size=96 $CV"
  run $X $MOBILENET
  run $X $MOBILENET -P stain_norm=macenko
  run $X $MOBILENET -P augment=hed
  run $X $MOBILENET -P tta=dihedral8
  for v in baseline cnn_lstm augmented; do run $X -P variant=$v; done
  run ${X/epochs=10/epochs=5} -P variant=densenet -P weights=none   # from scratch (no weights offline); 135 s an epoch: capped at 5
  # The same frozen MobileNet at BreaKHis' own 224 px (the images' size): does resolution limit it?
  run --experiment-name results-cv-breakhis $BH -P image_size=224 $CV $MOBILENET
fi
# IDC: a fold trains on ~6,500 patches (~10x a BreaKHis fold), so at most 10 epochs (patience 3) at the
# patches' own 50 px; every row uses the same folds.
if is cv-idc; then
  X="--experiment-name results-cv-idc $IDC -e cv -P folds=5 -P epochs=10 -P patience=3 -P lr_patience=2 -P gradcam_per_class=1"
  run $X $MOBILENET
  run $X -P variant=baseline
  run $X $MOBILENET -P stain_norm=macenko
  run $X $MOBILENET -P augment=hed
  run $X -P variant=cnn_lstm
  # The best setting, longer and at the Youden threshold (HED was still improving at 10 epochs).
  run ${X/epochs=10 -P patience=3/epochs=20 -P patience=4} $MOBILENET -P augment=hed -P threshold_policy=youden
  run $X -P variant=augmented
  # Fine-tuning the backbone (its BatchNorm statistics kept): all stages and the top one from a random head
  # at 1e-4, and all stages after
  # 10 epochs of the head alone (warm-up at 1e-3, as the frozen rows train it) at 1e-5.
  FT="-P variant=transfer -P backbone=mobilenet -P alpha=0.75 -P weights=imagenet -P unfrozen_blocks=3 -P augment=hed"
  Y="${X/epochs=10 -P patience=3/epochs=20 -P patience=4} -P threshold_policy=youden"
  run $Y $FT -P learning_rate=1e-4
  run $Y ${FT/unfrozen_blocks=3/unfrozen_blocks=1} -P learning_rate=1e-4
  run ${Y/epochs=20/epochs=10} $FT -P warmup_epochs=10 -P warmup_learning_rate=1e-3 -P learning_rate=1e-5
  run ${X/epochs=10/epochs=5} -P variant=densenet -P weights=none   # from scratch (no weights offline); 135 s an epoch: capped at 5
fi
# DenseNet121 with its pretrained ImageNet weights (by path: no download here), multi-scale fusion, the
# backbone frozen: the head trains on the taps cached once per image and image size (shared by the folds),
# 50 epochs with patience 10 (seconds each). The same folds as the rows above (seed 42), so compare pairs them.
DENSENET_WEIGHTS="$SHARED/keras-weights/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
DN="-P variant=densenet -P weights=$DENSENET_WEIGHTS -P unfrozen_blocks=0 -P augment=none -P learning_rate=1e-3 -P head_batchnorm=false"
DCV="-e cv -P folds=5 -P epochs=50 -P patience=10 -P lr_patience=5 -P gradcam_per_class=1"
if is cv-densenet-breakhis; then
  run --experiment-name results-cv-breakhis $BH $DCV $DN -P image_size=224
  run --experiment-name results-cv-breakhis $BH $DCV $DN -P image_size=128
  run --experiment-name results-cv-breakhis $BH $DCV $DN -P image_size=224 -P augment=seed
  run --experiment-name results-cv-breakhis $BH $DCV ${DN/head_batchnorm=false/head_batchnorm=true} -P image_size=224
  # The fusion's ablation: the last block's tap alone (the same cached features, the head on one tap).
  run --experiment-name results-cv-breakhis $BH $DCV $DN -P image_size=224 -P fusion_taps=last
  # The best earlier row again (same folds, same settings), for the paired comparison.
  run --experiment-name results-cv-breakhis $BH -P image_size=96 $CV -P variant=augmented
fi
if is cv-densenet-idc; then
  run --experiment-name results-cv-idc -P data_dir=$SHARED/data/idc $DCV $DN -P image_size=96
  run --experiment-name results-cv-idc -P data_dir=$SHARED/data/idc $DCV $DN -P image_size=50
  run --experiment-name results-cv-idc -P data_dir=$SHARED/data/idc $DCV $DN -P image_size=96 -P augment=seed
fi
# Optuna on the DenseNet121 fusion head (tuning/densenet_space.yaml), each trial scored on the 5 folds' inner
# validation patients (folds=5: the held-out folds stay unseen), the best then cross-validated on the same folds.
TUNE="-e tune -P variant=densenet -P weights=$DENSENET_WEIGHTS -P augment=none -P epochs=50 -P patience=10
  -P lr_patience=5 -P gradcam_per_class=1 -P search_space=tuning/densenet_space.yaml -P folds=5 -P n_trials=60
  -P trial_epochs=50 -P storage=sqlite:///$PWD/optuna-results.db"
if is tune-densenet-breakhis; then
  run --experiment-name results-cv-breakhis $BH $TUNE -P image_size=224
  # The same without BatchNorm in the head (the study above chose it, and its cross-validation called every
  # held-out image malignant: tuning/densenet_space_small.yaml says why).
  run --experiment-name results-cv-breakhis $BH ${TUNE/densenet_space.yaml/densenet_space_small.yaml} -P image_size=224
fi
if is tune-densenet-idc; then   # ~6,500 training patches a fold: batches of 256
  run --experiment-name results-cv-idc -P data_dir=$SHARED/data/idc $TUNE -P image_size=96 -P batch_size=256
fi
# The studies' best heads as fixed settings (no study needed), frozen, then the backbone fine-tuned from them: the
# head warm-up on the cached features is the frozen row's very fit (same seed, settings and head start), then the
# top stage (unfrozen_blocks=1) or all stages (3) train at 1e-5 on the images. BreaKHis at 224 and 128 px, IDC at
# 96 and 50 px (Youden threshold on IDC, as its tuned row).
TUNED_BH="-P dropout=0.21 -P fusion_width=83 -P class_weight=balanced -P optimizer=adam"
TUNED_IDC="-P dropout=0.13 -P fusion_width=154 -P batch_size=256 -P threshold_policy=youden"
FT="-e cv -P folds=5 -P patience=10 -P lr_patience=5 -P gradcam_per_class=1 -P variant=densenet -P weights=$DENSENET_WEIGHTS
  -P augment=none -P head_batchnorm=false"
FROZEN="$FT -P unfrozen_blocks=0 -P epochs=50"
if is finetune-densenet-breakhis; then
  X="--experiment-name results-cv-breakhis $BH $TUNED_BH"
  run $X $FROZEN -P learning_rate=2.1e-3 -P image_size=224
  run $X $FROZEN -P learning_rate=2.1e-3 -P image_size=128
  FT_BH="$FT -P warmup_epochs=50 -P warmup_learning_rate=2.1e-3 -P learning_rate=1e-5 -P image_size=224"
  run $X $FT_BH -P unfrozen_blocks=1 -P epochs=10
  run $X $FT_BH -P unfrozen_blocks=3 -P epochs=5   # ~2x the top stage's epoch: capped at 5
  run --experiment-name results-cv-breakhis $BH $DCV $DN -P image_size=224   # the default head again
fi
if is finetune-densenet-idc; then
  X="--experiment-name results-cv-idc -P data_dir=$SHARED/data/idc $TUNED_IDC"
  run $X $FROZEN -P learning_rate=4.3e-4 -P image_size=96
  run $X $FT -P warmup_epochs=50 -P warmup_learning_rate=4.3e-4 -P learning_rate=3e-5 -P image_size=96 \
    -P unfrozen_blocks=1 -P epochs=5   # batches of 256: 3e-5
  run --experiment-name results-cv-idc -P data_dir=$SHARED/data/idc $DCV $DN -P image_size=50 -P threshold_policy=youden
fi
# The fold ensemble of the tuned frozen DenseNet121 against its members, as below (ensemble-idc).
if is ensemble-densenet-idc; then
  HOLD=${HOLD:-$(mktemp -d)}
  python docs/ensemble_holdout.py split "$SHARED/data/idc" "$HOLD"
  run --experiment-name results-ensemble-idc -P data_dir="$HOLD/dev" -P image_size=96 $FROZEN $TUNED_IDC \
    -P learning_rate=4.3e-4 -P ensemble=true
  MLFLOW_EXPERIMENT_NAME=results-ensemble-idc python docs/ensemble_holdout.py score "$HOLD/holdout" \
    --experiment results-ensemble-idc > docs/results/ensemble-densenet-idc.md
fi
# The fold ensemble against its members on 42 IDC patients held out before a cross-validation of the other
# 181 (the best setting: frozen MobileNet, HED jitter, 20 epochs, Youden), scored through the served models.
if is ensemble-idc; then
  HOLD=${HOLD:-$(mktemp -d)}
  python docs/ensemble_holdout.py split "$SHARED/data/idc" "$HOLD"
  run --experiment-name results-ensemble-idc -P data_dir="$HOLD/dev" -P image_size=50 -e cv -P folds=5 -P epochs=20 \
    -P patience=4 -P lr_patience=2 -P gradcam_per_class=1 $MOBILENET -P augment=hed -P threshold_policy=youden \
    -P ensemble=true
  MLFLOW_EXPERIMENT_NAME=results-ensemble-idc python docs/ensemble_holdout.py score "$HOLD/holdout" \
    --experiment results-ensemble-idc \
    > docs/results/ensemble-idc.md
fi
# Threshold policies and dihedral TTA replayed on what the IDC cross-validations logged (no training: the
# fold networks are the logged ones). Run with the code version of those runs (their git commit).
if is thresholds; then
  python docs/replay_cv.py --experiment results-cv-idc --policies argmax,youden,sensitivity:0.8 \
    > docs/results/cv-idc/thresholds.md
  python docs/replay_cv.py --experiment results-cv-idc --policies argmax,youden --tta dihedral8 \
    > docs/results/cv-idc/tta.md
fi
if is compare; then
  for ds in ${COMPARE:-breakhis idc breakhis-densenet idc-densenet cv-breakhis cv-idc}; do
    run -e compare --experiment-name results-$ds -P output_dir=docs/results/$ds
  done
fi
