# Beauty validation at 12,000 steps: four HSTU candidates and the SASRec preset, five at once
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/h2
GENREC_DATA_DIR=$PWD/.gdata timeout 570 python3 bench/quality_sweep.py .devscripts/beauty_long.yaml --workers 5 \
  --out /tmp/h2sweep --json $OUT/h2/rows.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E1125" | tee $OUT/h2/sweep.log | tail -40
