"""Run every benchmark (`make bench`); the eval-throughput and system-comparison ones need the demo's
trained model and corpus (`make demo` first), and are skipped with a message without them."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
DEMO = HERE.parent / "demo_out"
DEMO_MODEL = DEMO / "runs" / "demo_cpu" / "stage2" / "best"
runs = [["bench_hub_cache.py"], ["bench_encoder_length.py"], ["bench_frame_cache.py"], ["serve_load.py"]]
if (DEMO_MODEL / "weights" / "config.json").is_file():
    runs.append(["bench_eval_throughput.py", "--model", str(DEMO_MODEL), "--corpus", str(DEMO / "corpus")])
    runs.append(["compare_systems.py", "--out", str(DEMO)])
else:
    print(f"(bench_eval_throughput.py, compare_systems.py skipped: no trained model at {DEMO_MODEL}; "
          "run `make demo` first)")
for script, *args in runs:
    print(f"\n## {script}\n", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)
