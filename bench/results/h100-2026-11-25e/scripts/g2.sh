# The whole test suite on the machine's jax (0.11.x), CPU backend, 16 workers; then the cost of
# model.moe.remat_blocks on the base train step
source .devscripts/pre.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_test/*.whl || exit 1
mkdir -p $OUT/g2
python3 -c "import jax, jaxlib, flax, optax, orbax.checkpoint, onnx, onnxruntime, jax2onnx, schemathesis, fastapi, hypothesis; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'onnx', onnx.__version__, 'ort', onnxruntime.__version__, 'schemathesis', schemathesis.__version__ if hasattr(schemathesis,'__version__') else '?', 'hypothesis', hypothesis.__version__)" 2>&1 | tail -1 | tee $OUT/g2/versions.txt
echo "== pytest $(date +%T)"
JAX_PLATFORMS=cpu timeout 420 python3 -m pytest -q -n 16 -p no:cacheprovider > $OUT/g2/pytest_full.log 2>&1
tail -5 $OUT/g2/pytest_full.log
echo "== remat_blocks $(date +%T)"
timeout 150 python3 bench/train_throughput.py --attention xla --steps 20 --set model.moe.remat_blocks=true --json $OUT/g2/tt_rematblocks.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E1125\|constant\|Constant\|^$\|^  %\|bug" | tail -2 | tee $OUT/g2/tt_rematblocks.log
echo "== done $(date +%T)"
cd $OUT && tar czf g2.tgz g2 && rm -rf g2
