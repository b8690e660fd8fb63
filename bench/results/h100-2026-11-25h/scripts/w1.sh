# Warp-specialised no-bias kernels: correctness (jax-triton and torch launchers), then timing at N=4096.
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/w1
F="grep -v ^WARNING\|^I0000\|^W0000\|^E11"
timeout 200 python3 bench/gpu_check.py --only ws --json $OUT/w1/gc_ws.json 2>&1 | $F > $OUT/w1/gc_ws.log; echo "gc_ws rc=$?"; tail -3 $OUT/w1/gc_ws.log
timeout 120 python3 -c "
import sys; sys.argv=['x']
sys.path.insert(0, '.')
import bench.gpu_check as g
from tests.kernels import test_hstu_attention_kernel as A
R = g.Runner(); g.run_ws(R, A, modes=('torch',), cases=g.WS_CASES, sweep=False)
print(sum(r['status']=='PASS' for r in R.rows), 'PASS of', len(R.rows))
" 2>&1 | $F > $OUT/w1/gc_ws_torch.log; tail -2 $OUT/w1/gc_ws_torch.log
timeout 300 python3 bench/kernels.py --ns 4096 --only attention --rab none --impls triton,triton-dqsep,triton-ws --configs sweep --verbose --json $OUT/w1/k4096.json 2>&1 | $F > $OUT/w1/k4096.log; echo "k rc=$?"
grep -E "hstu_attention|sweep|best" $OUT/w1/k4096.log | tail -40
