source .devscripts/pre.sh || exit 1
timeout 200 python .devscripts/tune.py 4096 $OUT/tune4096.json 2>&1 | tee $OUT/tune4096.log | grep -v Warning
timeout 300 python bench/gpu_check.py --only attention,torch --json $OUT/gc_at.json > $OUT/gc_at.log 2>&1; echo "gc rc $?"; grep -E "FAIL|rror" $OUT/gc_at.log | head -20; grep "stored" $OUT/gc_at.log | head -40; tail -2 $OUT/gc_at.log
