# The poisoned-output (torch launcher) checks on the GPU, with triton's cache directory made explicit
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/t1
python3 -c "
import os, triton, torch
from triton import knobs
print('triton', triton.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())
print('cache.dir', repr(knobs.cache.dir), 'home', repr(knobs.cache.home_dir), 'env', repr(os.environ.get('TRITON_CACHE_DIR')), 'HOME', repr(os.environ.get('HOME')))
" 2>&1 | tee $OUT/t1/diag.log
timeout 200 python3 bench/gpu_check.py --only torch --json $OUT/t1/rows.json 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E1125" > $OUT/t1/gpu_check_torch.log
tail -45 $OUT/t1/gpu_check_torch.log
