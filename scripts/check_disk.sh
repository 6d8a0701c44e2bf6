#!/usr/bin/env bash
# check_disk.sh DIR GB: fail with one clear line when DIR's disk has less than GB gigabytes free.
# A fresh setup needs about 6 GB: the venv (~4.1 GB: torch, ray, the model wheels) and the
# assembled models under $COE_HOME (~1.8 GB).
set -euo pipefail
dir="$1"; need_gb="$2"
free_kb=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
if [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
  echo "setup needs about $need_gb GB free on the disk of $(cd "$dir" && pwd); it has $((free_kb / 1024)) MiB free" >&2
  exit 1
fi
