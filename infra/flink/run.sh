#!/usr/bin/env bash
# Run a kdstore capture on a Flink cluster through Beam's portable Flink job server.
#
#   FLINK_MASTER=flink-jobmanager:8081 IMAGE=REGISTRY/kdstore-worker:cpu \
#   TEACHER=/models/teacher INPUT='hdfs:///corpus/*.txt' OUTPUT=hdfs:///stores/run1 infra/flink/run.sh [kd cache flags...]
#
# Starts the job server container (apache/beam_flink<FLINK_VERSION>_job_server) next to the
# client unless JOB_ENDPOINT points at a running one; SDK workers run in the kdstore worker
# image (DOCKER environment) on the task managers. The teacher path must be readable by the
# workers (baked into the image, a shared mount, or a gs://, s3://, hdfs:// URI).
set -euo pipefail

: "${FLINK_MASTER:?set FLINK_MASTER (host:port of the Flink REST endpoint)}"
: "${IMAGE:?set IMAGE to the worker container built from infra/Dockerfile}"
: "${TEACHER:?set TEACHER}"
: "${INPUT:?set INPUT}"
: "${OUTPUT:?set OUTPUT}"
FLINK_VERSION="${FLINK_VERSION:-1.20}"
BEAM_VERSION="${BEAM_VERSION:-2.77.0}"
PARALLELISM="${PARALLELISM:-8}"

if [[ -z "${JOB_ENDPOINT:-}" ]]; then
  docker run -d --rm --net=host --name kd-flink-job-server \
    "apache/beam_flink${FLINK_VERSION}_job_server:${BEAM_VERSION}" --flink-master="${FLINK_MASTER}"
  trap 'docker stop kd-flink-job-server >/dev/null 2>&1 || true' EXIT
  JOB_ENDPOINT=localhost:8099
  sleep 10
fi

set -x
python -m pipelines.capture \
  --runner PortableRunner \
  --job_endpoint "${JOB_ENDPOINT}" \
  --environment_type DOCKER \
  --environment_config "${IMAGE}" \
  --parallelism "${PARALLELISM}" \
  --teacher "${TEACHER}" --input "${INPUT}" --output "${OUTPUT}" \
  "$@"
