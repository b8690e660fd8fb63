# where the base XLA step's time goes with query blocks of 128 (command buffers off), mapped to jax ops
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/f6
XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step" \
  timeout 300 python3 bench/train_throughput.py --attention xla --steps 10 --profile /tmp/prof --profile-top 60 \
  --json $OUT/f6/ttx_prof.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E1125\|constant\|Constant\|^$\|^  %\|bug" | tail -75 > $OUT/f6/ttx_prof.log
python3 .devscripts/hlo_map.py $OUT/f6/ttx_prof.jsonl /tmp/hlo $OUT/f6/hlo_map_stepx.txt
head -20 $OUT/f6/ttx_prof.log; tail -3 $OUT/f6/ttx_prof.log
echo "== done $(date +%T)"
cd $OUT && tar czf f6.tgz f6 && rm -rf f6
