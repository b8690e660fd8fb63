# Beauty validation: the HSTU preset beside a dense FFN, a third layer and the causal-count norm; best refit on test
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/r9
GENREC_DATA_DIR=$PWD/.gdata timeout 560 python3 bench/quality_sweep.py .devscripts/beauty_r9.yaml --workers 4 --only hstu \
  --out /tmp/r9sweep --json $OUT/r9/rows.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E1125" | tee $OUT/r9/sweep.log | tail -25
