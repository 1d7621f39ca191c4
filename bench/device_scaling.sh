#!/usr/bin/env bash
# The scaling bench on the GPU machine, through a local Ray cluster (one head: every CPU and the GPU).
# Here first: ../shared/tools/device-pack (no dataset needed) and python bench/device_ray_pack.py; then a device
# run with carry [".device"] and
#   bash bench/device_scaling.sh OUT_DIR TAG SIZE...     e.g. bash bench/device_scaling.sh $OUT scaling_h200_ray 10000 100000 1000000
# The text tower there is MiniLM's shape with zeroed weights (the 90 MB weights cannot travel): its speed is the
# real model's, its vectors are not, and no stage after it reads them (the bench's stand-in vectors).
# With BENCH_BACKGROUND=1 the bench runs detached (setsid) and this returns at once; `bash bench/device_scaling.sh
# --wait OUT_DIR SECONDS` then waits up to SECONDS and copies what is done (a call runs at most 10 minutes).
set -u
W=/tmp/semalign-scaling
if [ "${1:-}" = "--wait" ]; then
  out=$2; deadline=$(( $(date +%s) + $3 ))
  while [ ! -f $W/done ] && [ $(date +%s) -lt $deadline ]; do sleep 5; done
  cp $W/log $out/ 2>/dev/null; cp $W/out/* $out/ 2>/dev/null
  [ -f $W/done ] && echo "bench finished: $(cat $W/done)" || echo "bench still running"; tail -n 40 $W/log; exit 0
fi
out=$1; tag=$2; shift 2; R=$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONDONTWRITEBYTECODE=1
# REUSE=1 keeps an earlier call's work folder (same machine, still warm): set STAGES to the stages left to run
[ "${REUSE:-0}" = "1" ] && [ -d $W/work ] && rm -rf $W/out $W/done $W/site || rm -rf $W; mkdir -p $W/out
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --ignore-requires-python \
  --target $W/site .device/whl/*.whl >$W/pip.log 2>&1 || { cat $W/pip.log; echo "wheel install failed"; exit 1; }
export PYTHONPATH=$W/site
m=$W/text-model; mkdir -p $m; cp .device/model/*.json .device/model/*.txt $m/ 2>/dev/null
cp .device/model/head $m/model.safetensors; truncate -s $(cat .device/model/size) $m/model.safetensors
export SEMALIGN_TEXT_MODEL=$m
stages=${STAGES:-synth,load,text_tower,tower_cache,pairs,encoder_epoch,encoder_metrics,codebook,sid_assign,histories,user_table,ranker_epoch,evaluate}
run() {
  # from the work folder: the checkout's own semalign/ folder would shadow the installed package (cwd on sys.path)
  cd $W
  # the head starts here, inside the (possibly detached) session: a call's own processes end when the call returns
  python3 -m ray.scripts.scripts start --head --node-ip-address 127.0.0.1 --port 6380 --include-dashboard false \
    --disable-usage-stats --temp-dir /tmp/rt >$W/ray.log 2>&1 || { cat $W/ray.log; echo "rc=ray" > $W/done; return 1; }
  BENCH_COMMAND_PREFIX="bash bench/device_scaling.sh \$OUT $tag $* ->" python3 $R/bench/bench_scaling.py --sizes "$@" \
    --stages $stages --device cuda --ray 127.0.0.1:6380 --heavy-max 100000000 --ranker-max-train 1000000000 \
    --max-eval-pairs 50000 --stage-timeout 1500 --work $W/work --tag $tag --out $W/out
  echo "rc=$?" > $W/done
  python3 -m ray.scripts.scripts stop >/dev/null 2>&1
}
if [ "${BENCH_BACKGROUND:-0}" = "1" ]; then
  export -f run; export W R tag stages
  setsid bash -c "run $*" > $W/log 2>&1 < /dev/null &
  sleep 2; echo "started in the background"; exit 0
fi
run "$@" 2>&1 | tee $W/log; cp $W/out/* $out/
