# After factoring the dQ kernels' prologue (_dq_program): every configuration pinned, on the GPU.
source .devscripts/pre.sh || exit 1
timeout 200 python bench/gpu_check.py --only configs --json $OUT/gc_cfg2.json > $OUT/gc_cfg2.log 2>&1; echo "gc rc $?"; grep -E "FAIL|rror" $OUT/gc_cfg2.log | head; tail -1 $OUT/gc_cfg2.log
