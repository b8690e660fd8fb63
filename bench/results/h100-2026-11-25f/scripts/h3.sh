# Beauty validation at 12,000 steps: three HSTU and two SASRec candidates, five at once
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/h3
GENREC_DATA_DIR=$PWD/.gdata timeout 570 python3 bench/quality_sweep.py .devscripts/beauty_long2.yaml --workers 5 \
  --out /tmp/h3sweep --json $OUT/h3/rows.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E1125" | tee $OUT/h3/sweep.log | tail -40
