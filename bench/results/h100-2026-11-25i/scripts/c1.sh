source .devscripts/pre.sh || exit 1
python -c "import jax; print(jax.__version__, jax.devices())"
timeout 170 python bench/gpu_check.py --only configs --json $OUT/gc_cfg.json > $OUT/gc_cfg.log 2>&1; echo "gc rc $?"; grep -c PASS $OUT/gc_cfg.log; grep -E "FAIL|Error|error" $OUT/gc_cfg.log | head -20; tail -3 $OUT/gc_cfg.log
timeout 170 python bench/kernels.py --only attention --ns 4096 --rab none --impls triton,triton-dqsep,triton-dqst --verbose --json $OUT/k4096.json > $OUT/k4096.log 2>&1; echo "k4096 rc $?"; cat $OUT/k4096.log | tail -40
timeout 120 python bench/kernels.py --only attention --ns 1024,8192 --rab none --impls triton,triton-dqst --json $OUT/k1k8k.json > $OUT/k1k8k.log 2>&1; echo "k1k8k rc $?"; tail -12 $OUT/k1k8k.log
timeout 100 python bench/kernels.py --only attention --ns 512 --batch 64 --heads 8 --dim 64 --rab pos+time --impls triton,triton-dqst --json $OUT/k512.json > $OUT/k512.log 2>&1; echo "k512 rc $?"; tail -8 $OUT/k512.log
