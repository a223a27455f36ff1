#!/bin/bash
# Train SynthKit models on a lent GPU machine (JAX backend). Each argument is one run,
#   NAME:TASK:[INIT][:KEY=JSON;KEY=JSON...]
# trained in runs/NAME from the weights INIT (shipped or work-in-progress), or resumed there when
# an earlier call on the same machine left a checkpoint; the KEY=JSON items are train.py --set
# overrides. All runs train concurrently for $MINUTES minutes (default 8); then each run
# directory and its log are packed into $OUT/NAME.tgz. $WORKERS lists, run by run, how many CPU
# processes generate its training data (default 0: the training process itself, which leaves
# the GPU mostly idle). $SNAPSHOT_EVERY (steps, default 0: none) keeps weight snapshots in
# the run directory (about 6 MB each for SynthSeg, the last 10), for an export averaging them
# (train.py --export-only --average K).
#
#   WORKERS="10" bash scripts/device_train.sh \
#       synthmorph_deform:synthmorph_deform:models/synthmorph_deform
#
# Needs the wheels in .whl/ (keras, namex, optree, nibabel for the machine's Python) and the
# label maps in .data/label_maps/, both ignored by git and carried by the device tool.
set -u
MINUTES=${MINUTES:-8}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/python KERAS_BACKEND=jax PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" runs
names=()
read -r -a workers <<< "${WORKERS:-}"
for spec in "$@"; do
    IFS=: read -r name task init sets <<< "$spec"
    args=(--task "$task" --labels .data/label_maps --run "runs/$name" --steps 1000000
          --minutes "$MINUTES" --checkpoint-minutes 2 --workers "${workers[${#names[@]}]:-0}"
          --snapshot-every "${SNAPSHOT_EVERY:-0}")
    [ -n "$init" ] && [ ! -f "runs/$name/state.json" ] && args+=(--init "$init")
    IFS=';' read -r -a items <<< "${sets:-}"
    for item in "${items[@]}"; do args+=(--set "$item"); done
    python3 scripts/train.py "${args[@]}" > "runs/$name.log" 2>&1 &
    names+=("$name")
done
wait
for name in "${names[@]}"; do
    echo "== $name"; grep -v -i warn "runs/$name.log" | tail -3; tail -2 "runs/$name/log.csv"
    tar czf "$OUT/$name.tgz" -C runs "$name" "$name.log"
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader
