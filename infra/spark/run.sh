#!/usr/bin/env bash
# Run a kdstore capture on a Spark cluster through Beam's portable Spark job server.
#
#   SPARK_MASTER=spark://spark-master:7077 IMAGE=REGISTRY/kdstore-worker:cpu \
#   TEACHER=/models/teacher INPUT='hdfs:///corpus/*.txt' OUTPUT=hdfs:///stores/run1 infra/spark/run.sh [kd cache flags...]
#
# Starts the job server container (apache/beam_spark3_job_server) next to the client unless
# JOB_ENDPOINT points at a running one; SDK workers run in the kdstore worker image.
set -euo pipefail

: "${SPARK_MASTER:?set SPARK_MASTER (spark://host:7077)}"
: "${IMAGE:?set IMAGE to the worker container built from infra/Dockerfile}"
: "${TEACHER:?set TEACHER}"
: "${INPUT:?set INPUT}"
: "${OUTPUT:?set OUTPUT}"
BEAM_VERSION="${BEAM_VERSION:-2.77.0}"

if [[ -z "${JOB_ENDPOINT:-}" ]]; then
  docker run -d --rm --net=host --name kd-spark-job-server \
    "apache/beam_spark3_job_server:${BEAM_VERSION}" --spark-master-url="${SPARK_MASTER}"
  trap 'docker stop kd-spark-job-server >/dev/null 2>&1 || true' EXIT
  JOB_ENDPOINT=localhost:8099
  sleep 10
fi

set -x
python -m pipelines.capture \
  --runner PortableRunner \
  --job_endpoint "${JOB_ENDPOINT}" \
  --environment_type DOCKER \
  --environment_config "${IMAGE}" \
  --teacher "${TEACHER}" --input "${INPUT}" --output "${OUTPUT}" \
  "$@"
