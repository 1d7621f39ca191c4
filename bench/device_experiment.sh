#!/usr/bin/env bash
# One `semalign experiment` seed per process, spread over the GPUs of the device machine, then one merged table.
# Run there after ../shared/tools/device-pack (carry [".device"]):
#   bash bench/device_experiment.sh DATASET SEEDS MODELS TAG [experiment options...]
# writes $OUT/TAG.sN.json (+ predictions) and a log per seed; merge them anywhere with
#   semalign experiment --merge TAG.s0.json --merge TAG.s1.json ... --out TAG.json
set -u
export PYTHONSAFEPATH=1  # the repository's own semalign/ folder must not shadow the installed package
name=$1; seeds=$2; models=$3; tag=$4; shift 4
ngpu=$(nvidia-smi -L | wc -l)
start=$(date +%s)
for s in $(seq 0 $((seeds - 1))); do
  OMP_NUM_THREADS=${THREADS:-3} CUDA_VISIBLE_DEVICES=$(( (s + ${GPU_OFFSET:-0}) % ngpu )) bash .device/run.sh experiment --data .device/data/$name \
    --seeds 1 --seed-start $s --models "$models" --out $OUT/$tag.s$s.json "$@" > $OUT/$tag.s$s.log 2>&1 &
done
wait
echo "$tag: $seeds seeds in $(( $(date +%s) - start )) s on $ngpu GPU(s)"
# the device tool brings back only a few files: one archive of the results
tar -C $OUT -czf $OUT/$tag.tgz $(cd $OUT && ls $tag.s*.json $tag.s*.preds.npz $tag.s*.log 2>/dev/null)
(cd $OUT && rm -f $tag.s*)
