source .devscripts/pre.sh || exit 1
timeout 330 python bench/kernels.py --only attention --ns 256,1024,4096,8192 --rab none --impls triton,triton-atomic,xla --skip-xla-above 4096 --json $OUT/k_none.json --plot $OUT/k_none.png > $OUT/k_none.log 2>&1; echo "k_none rc $?"; sed -n '/=====/,$p' $OUT/k_none.log
timeout 220 python bench/kernels.py --only attention --ns 1024,4096 --rab pos+time --impls triton,triton-atomic --json $OUT/k_rab.json > $OUT/k_rab.log 2>&1; echo "k_rab rc $?"; sed -n '/=====/,$p' $OUT/k_rab.log
