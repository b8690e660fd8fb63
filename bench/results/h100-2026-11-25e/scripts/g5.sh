# XLA attention products in the inputs' dtype: the reference against float64 on the GPU, and the
# attention tests with the GPU backend
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/g5
timeout 240 python3 bench/gpu_check.py --only reference,sharded --json $OUT/g5/gpu_check.json > $OUT/g5/gpu_check.log 2>&1; echo "gpu_check rc $?"
grep -v "^WARNING\|^I0000\|^W0000" $OUT/g5/gpu_check.log | tail -25
JAX_PLATFORMS=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/ops/test_hstu_attention.py > $OUT/g5/pytest_ops_gpu.log 2>&1; echo "pytest rc $?"
tail -3 $OUT/g5/pytest_ops_gpu.log
cd $OUT && tar czf g5.tgz g5 && rm -rf g5
