"""Run every benchmark (`make bench`); the eval-throughput one needs the demo's trained model (`make demo`)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
DEMO_MODEL = HERE.parent / "demo_out" / "runs" / "demo_cpu" / "stage2" / "final"
runs = [["bench_hub_cache.py"], ["bench_encoder_length.py"]]
if (DEMO_MODEL / "weights" / "config.json").is_file():
    runs.append(["bench_eval_throughput.py", "--model", str(DEMO_MODEL), "--corpus", str(HERE.parent / "demo_out" / "corpus")])
for script, *args in runs:
    print(f"\n## {script}\n", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)
if len(runs) == 2:
    print(f"\n(bench_eval_throughput.py skipped: no trained model at {DEMO_MODEL}; run `make demo` first)")
