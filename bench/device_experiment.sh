#!/usr/bin/env bash
# One `semalign experiment` seed per process, spread over the GPUs of the device machine, then one merged table.
# Run there after ../shared/tools/device-pack (carry [".device"]):
#   bash bench/device_experiment.sh DATASET SEEDS MODELS TAG [experiment options...]
# (SEED_START=k runs seeds k..k+SEEDS-1, so a catalogue too slow for one call takes its seeds over several)
# writes $OUT/TAG.sN.json (+ predictions) and a log per seed; merge them anywhere with
#   semalign experiment --merge TAG.s0.json --merge TAG.s1.json ... --out TAG.json
# DEADLINE=seconds stops seeds still running then and packs what finished (the device call's limit is hard:
# a killed call brings nothing back). A text-tower cache stored as float16 (vectors.f16.npy, to fit the carry)
# is restored to float32 first.
set -u
export PYTHONSAFEPATH=1  # the repository's own semalign/ folder must not shadow the installed package
name=$1; seeds=$2; models=$3; tag=$4; shift 4
python3 - <<'PY'
import glob, os
import numpy as np
for p in glob.glob(".device/home/cache/*/vectors.f16.npy"):
    try:  # another invocation may be restoring it at the same time
        v = np.load(p).astype(np.float32)
        np.save(p.replace(".f16.npy", f".{os.getpid()}.tmp.npy"), v)
        os.replace(p.replace(".f16.npy", f".{os.getpid()}.tmp.npy"), p.replace(".f16", ""))
        os.remove(p)
    except (FileNotFoundError, ValueError):
        pass
PY
ngpu=$(nvidia-smi -L | wc -l)
start=$(date +%s)
pids=()
first=${SEED_START:-0}
for s in $(seq $first $((first + seeds - 1))); do
  OMP_NUM_THREADS=${THREADS:-3} CUDA_VISIBLE_DEVICES=$(( (s + ${GPU_OFFSET:-0}) % ngpu )) setsid bash .device/run.sh experiment --data .device/data/$name \
    --seeds 1 --seed-start $s --models "$models" --out $OUT/$tag.s$s.json "$@" > $OUT/$tag.s$s.log 2>&1 &
  pids+=($!)
done
deadline=$(( start + ${DEADLINE:-100000} ))
while [ "$(jobs -rp | wc -l)" -gt 0 ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 2; done
for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null && echo "$tag: stopped seed process group $p at the deadline"; done
echo "$tag: $seeds seeds in $(( $(date +%s) - start )) s on $ngpu GPU(s)"
# the device tool brings back at most 8 files of 16 MiB: one archive of the results, or one per seed
# (PER_SEED=1) where the predictions of a large catalogue would not fit one
if [ "${PER_SEED:-0}" = 1 ]; then
  for s in $(seq $first $((first + seeds - 1))); do
    tar -C $OUT -czf $OUT/$tag-seed$s.tgz $(cd $OUT && ls $tag.s$s.json $tag.s$s.preds.npz $tag.s$s.log 2>/dev/null)
  done
  (cd $OUT && rm -f $tag.s*)  # the per-seed .md and plots too: every file counts against the 8
else
  tar -C $OUT -czf $OUT/$tag.tgz $(cd $OUT && ls $tag.s*.json $tag.s*.preds.npz $tag.s*.log 2>/dev/null)
  (cd $OUT && rm -f $tag.s*)
fi
