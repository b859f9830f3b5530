#!/usr/bin/env bash
# Launch a kdstore capture (`kd cache`) on Google Cloud Dataflow (Runner v2, custom container).
#
# Usage:
#   PROJECT=my-proj REGION=us-central1 BUCKET=gs://my-bucket IMAGE=us-docker.pkg.dev/my-proj/kd/kdstore-worker:cpu \
#   TEACHER=gs://my-bucket/models/teacher INPUT='gs://my-bucket/corpus/*.jsonl' OUTPUT=gs://my-bucket/stores/run1 \
#   infra/dataflow/launch.sh cpu [extra kd cache flags...]
#
#   ... IMAGE=...:gpu infra/dataflow/launch.sh gpu --select sample --samples 50
#
# Variants:
#   cpu  n2-highmem-8 workers; one SDK process per vCPU sharing one teacher per VM (large_model).
#   gpu  g2-standard-8 workers with one NVIDIA L4 each, driver installed by Dataflow; one SDK
#        process per VM (no_use_multiple_sdk_containers) so exactly one model sits on the GPU,
#        bf16. For several GPUs per VM use the default SDK layout with --model-copies N instead.
# Extra arguments are passed to `kd cache` unchanged (e.g. --resume, --select top_p).
set -euo pipefail

variant="${1:-cpu}"
shift || true

: "${PROJECT:?set PROJECT}"
: "${REGION:?set REGION}"
: "${BUCKET:?set BUCKET (gs://...) for staging and temp files}"
: "${IMAGE:?set IMAGE to the worker container built from infra/Dockerfile}"
: "${TEACHER:?set TEACHER (a model directory, local or gs://)}"
: "${INPUT:?set INPUT (file, glob or gs:// URI)}"
: "${OUTPUT:?set OUTPUT (gs:// store directory)}"
JOB_NAME="${JOB_NAME:-kd-cache-$(date +%Y%m%d-%H%M%S)}"
MAX_WORKERS="${MAX_WORKERS:-8}"

common=(
  --runner DataflowRunner
  --project "${PROJECT}"
  --region "${REGION}"
  --job_name "${JOB_NAME}"
  --temp_location "${BUCKET}/tmp"
  --staging_location "${BUCKET}/staging"
  --sdk_container_image "${IMAGE}"
  --sdk_location container
  --experiments use_runner_v2
  --max_num_workers "${MAX_WORKERS}"
  --teacher "${TEACHER}"
  --input "${INPUT}"
  --output "${OUTPUT}"
)

case "${variant}" in
  cpu)
    variant_args=(
      --machine_type "${MACHINE_TYPE:-n2-highmem-8}"
      --device cpu
    )
    ;;
  gpu)
    variant_args=(
      --machine_type "${MACHINE_TYPE:-g2-standard-8}"
      --dataflow_service_options "worker_accelerator=type:${GPU_TYPE:-nvidia-l4};count:${GPU_COUNT:-1};install-nvidia-driver"
      --experiments no_use_multiple_sdk_containers
      --device cuda
      --dtype bfloat16
      --batch-tokens "${BATCH_TOKENS:-65536}"
      --micro-batch-tokens "${MICRO_BATCH_TOKENS:-32768}"
    )
    ;;
  *)
    echo "usage: $0 cpu|gpu [kd cache flags...]" >&2
    exit 2
    ;;
esac

set -x
exec python -m pipelines.capture "${common[@]}" "${variant_args[@]}" "$@"
