#!/usr/bin/env bash
# Runs tfusion-train on every host of a Cloud TPU pod slice (the same command on all workers;
# on a TPU VM tfusion-train always calls jax.distributed.initialize(), which finds the other
# hosts from the TPU metadata; one host makes a single process).
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--dry-run] -- \
#       --config experiments/configs/paper.py:0.37B --workdir /gcs/bucket/run1 [--config.key=value ...]
#
# The repository must be checked out at the same path on every host (REPO, default ~/tfusion)
# with `pip install -e .` done there; --setup does both from GIT_URL first.
set -euo pipefail

TPU="" ZONE="" PROJECT="" DRY_RUN=0 SETUP=0
REPO="${REPO:-~/tfusion}" GIT_URL="${GIT_URL:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --setup) SETUP=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (train flags go after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "--tpu and --zone are required" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "pass the tfusion-train flags after --" >&2; exit 2; }

train_args=$(printf ' %q' "$@")
remote="cd $REPO && tfusion-train$train_args 2>&1 | tee -a train-\$(hostname).log"
if [[ $SETUP -eq 1 ]]; then
  [[ -n "$GIT_URL" ]] || { echo "--setup needs GIT_URL" >&2; exit 2; }
  remote="(test -d $REPO || git clone $GIT_URL $REPO) && cd $REPO && git pull && pip install -e . && $remote"
fi
cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$remote")
[[ -n "$PROJECT" ]] && cmd+=(--project "$PROJECT")
if [[ $DRY_RUN -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
fi
