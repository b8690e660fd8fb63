# Beauty validation: the HSTU preset with and without the retrieval projection, two learning rates
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/h1
nvidia-smi --query-gpu=name --format=csv,noheader
GENREC_DATA_DIR=$PWD/.gdata timeout 560 python3 bench/quality_sweep.py .devscripts/beauty_proj.yaml --workers 4 \
  --out $OUT/h1/sweep --json $OUT/h1/rows.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E1125" | tee $OUT/h1/sweep.log | tail -40
cd $OUT && tar czf h1.tgz h1 && rm -rf h1
