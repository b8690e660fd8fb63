# Device setup: the snapshot of the tree over the checkout, the carried wheels, the package.
if [ -d .snap ]; then cp -r .snap/. . ; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip_e.log 2>&1 || { tail -5 /tmp/pip_e.log; return 1; }
export GENREC_TRITON_AUTOTUNE=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
