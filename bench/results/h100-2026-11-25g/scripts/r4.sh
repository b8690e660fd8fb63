# Time-bias gradient by run sums (TIME_HIST=1) against per-bucket passes: kernel sweeps, then correctness
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/r4
f() { grep -v "^WARNING\|^I0000\|^W0000\|^E1125"; }
timeout 170 python3 bench/kernels.py --ns 512 --batch 64 --heads 8 --dim 64 --rab pos+time --only attention \
  --impls triton,triton-dqsep --configs sweep --verbose --json $OUT/r4/train_shape.jsonl 2>&1 | f > $OUT/r4/train_shape.log
tail -8 $OUT/r4/train_shape.log
timeout 170 python3 bench/kernels.py --ns 4096 --rab pos+time --only attention \
  --impls triton --configs sweep --verbose --json $OUT/r4/n4096.jsonl 2>&1 | f > $OUT/r4/n4096.log
tail -6 $OUT/r4/n4096.log
timeout 200 python3 bench/gpu_check.py --only configs --json $OUT/r4/check.json 2>&1 | f > $OUT/r4/check.log
tail -3 $OUT/r4/check.log; grep -c FAIL $OUT/r4/check.log
