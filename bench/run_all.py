"""Run every benchmark that needs no trained model (`make bench`)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
for script in ("bench_hub_cache.py", "bench_encoder_length.py"):
    print(f"\n## {script}\n", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
print("\n(bench_eval_throughput.py needs a trained model: run it after `make demo`, see its docstring)")
