# TMA-reduce dQ experiment (jax-triton global-scratch patch), then the d=1024 XLA step profile
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/f2
timeout 330 python3 .devscripts/tma/f2.py $OUT/f2/tma.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -40 | tee $OUT/f2/tma.log
echo "== prof $(date +%T)"
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 200 python3 bench/train_throughput.py --attention xla --steps 10 \
  --set model.embed_dim=1024 --set model.attn_dim=128 --set model.linear_dim=128 --set model.moe.expert_dim=2048 \
  --profile /tmp/prof --profile-top 25 --json $OUT/f2/tt_prof.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -45 | tee $OUT/f2/tt_prof.log
echo "== done $(date +%T)"
cd $OUT && tar czf f2.tgz f2 && rm -rf f2
