# Poisoned-output (torch launcher) checks: attention, cached, interaction and (new) the MoE grouped matmul
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/r2
timeout 520 python3 bench/gpu_check.py --only torch --json $OUT/r2/rows.json 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E1125" > $OUT/r2/gpu_check_torch.log
tail -30 $OUT/r2/gpu_check_torch.log
