#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice and stream worker 0's log.
#
#   scripts/launch_tpu.sh --name=my-v5p --zone=us-east5-a --accelerator=v5p-64 [--create] \
#       [--version=v2-alpha-tpuv5] [--dry_run] -- \
#       python -m lm.train --config=configs/llama_1b.py --workdir=gs://bucket/runs/llama
#
# Steps: create the slice (with --create), copy this checkout to every worker (git archive of HEAD),
# install it there, start the same command on all workers in the background (JAX finds the other
# workers itself: no coordinator flags on TPU), then follow worker 0's log. --dry_run prints the
# gcloud commands instead of running them. Needs the gcloud CLI, logged in, with a default project.
set -euo pipefail
cd "$(dirname "$0")/.."

name="" zone="" accelerator="" version="v2-alpha-tpuv5" create=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --create) create=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1; see the usage at the top of $0" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$name" || -z "$zone" || $# -eq 0 ]]; then
  echo "error: --name, --zone and a command after -- are required; see the usage at the top of $0" >&2
  exit 2
fi
if [[ $create -eq 1 && -z "$accelerator" ]]; then
  echo "error: --create needs --accelerator (e.g. v5p-64)" >&2
  exit 2
fi

run() {  # print the command; run it unless --dry_run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

tpu=(gcloud compute tpus tpu-vm)
command="$(printf '%q ' "$@")"
if [[ $create -eq 1 ]]; then
  run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$accelerator" --version="$version"
fi
archive="$(mktemp -d)/lm.tar.gz"
run git archive --format=tar.gz -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name:lm.tar.gz" --zone="$zone" --worker=all
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="rm -rf lm && mkdir lm && \
tar xzf lm.tar.gz -C lm && pip install -q -e ./lm 'jax[tpu]'"
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="cd lm && \
nohup $command > run.log 2>&1 &"
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=0 --command="tail -F lm/run.log"
