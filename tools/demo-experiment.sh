#!/usr/bin/env bash
# Runs one of the demo's long experiments the way its committed results were made: each
# seed a process of its own, side by side (one thread each when the cores are fewer than
# the seeds; torch gains little from a second thread at these sizes), then merges them.
#
#   tools/demo-experiment.sh sequential|lr-sweep OUTPUT_DIR [SEEDS] [more demo options]
#
# Each seed's folder (OUTPUT_DIR/seed-N) keeps its log; OUTPUT_DIR gets the merged results.
set -euo pipefail
experiment=${1:?usage: tools/demo-experiment.sh sequential|lr-sweep OUTPUT_DIR [SEEDS] [demo options]}
output=${2:?usage: tools/demo-experiment.sh sequential|lr-sweep OUTPUT_DIR [SEEDS] [demo options]}
seeds=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
case $experiment in
    sequential|lr-sweep) ;;
    *) echo "demo-experiment: the experiment is sequential or lr-sweep, not '$experiment'" >&2; exit 2 ;;
esac
[[ $seeds =~ ^[1-9][0-9]*$ ]] || { echo "demo-experiment: SEEDS is a positive count, not '$seeds'" >&2; exit 2; }
python=${PY:-.venv/bin/python}
cores=$(nproc)
threads=$(( cores / seeds > 0 ? cores / seeds : 1 ))

mkdir -p "$output"
pids=() dirs=()
for (( seed = 0; seed < seeds; seed++ )); do
    dir=$output/seed-$seed
    mkdir -p "$dir"
    "$python" -m featadapt.demo --experiment "$experiment" --seed "$seed" --seeds 1 --threads "$threads" \
        --output-dir "$dir" "$@" >"$dir/log.txt" 2>&1 &
    pids+=($!) dirs+=("$dir")
done
echo "demo-experiment: $seeds $experiment processes ($threads thread(s) each); logs in $output/seed-*/log.txt"
failed=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "demo-experiment: seed $i failed; see ${dirs[$i]}/log.txt" >&2; failed=1; }
done
(( failed == 0 )) || exit 1
"$python" -m featadapt.demo --experiment "$experiment" --merge-seeds "${dirs[@]}" --output-dir "$output"
