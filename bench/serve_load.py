"""Load test of `emoq serve`: do misbehaving clients slow down the well-behaved ones?

    python bench/serve_load.py [--seconds 40] [--clients 8]

Starts `emoq serve` (a separate process on a free loopback port, default limits) around a tiny random
model built in code and saved to a temporary folder, then runs two phases of `--seconds` each:
  without bad clients: 8 well-behaved clients, each classifying a 2 s clip (/v1/audio/emotion) in a loop;
  with bad clients:    the same 8, plus one client sending chats with a 100 KB question, and one client
                       abandoning 512-token chats: a stream it hangs up on after the first chunk, and a
                       non-streaming chat it gives up on after --patience seconds, in turn.
Prints the well-behaved clients' p50/p95 latency in each phase, what the bad clients got, and the ratio
of the p95s (acceptance: at most 2). Ends by itself, after about 2 x --seconds plus the server's start.
The well-behaved clients are threads of this process; each bad client runs in a niced process of its
own (--bad-nice), standing in for a client on another machine: this machine's CPUs are the server's.

What bad clients may still cost: the server drops a call whose client left before its turn and stops a
generation at the next decoding step after the hang-up, but the steps taken while the client still
waited were asked for. The default --patience makes the abandoned chats leave while queued (the case of
abandoned work piling up); a larger one measures a client that holds the single model thread for up to
that long per request (as one legitimate 512-token chat would). A 100 KB question is refused in about a
millisecond, but a client that repeats it in a tight loop still takes that CPU from the model on a small
machine (--bad-nice 0 shows how much). Timings depend on the machine; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

LABELS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
MODEL = "emoq-bench"
ROOT = Path(__file__).resolve().parents[1]


def wav_b64(seconds: float, seed: int = 0) -> str:
    import soundfile as sf

    audio = (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def chat_body(audio: str, question: str, **extra) -> dict:
    parts = [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}, {"type": "text", "text": question}]
    return {"model": MODEL, "messages": [{"role": "user", "content": parts}], **extra}


def save_tiny_model(folder: Path) -> Path:
    """The tests' tiny random EmoQ model (LoRA, seed 3), saved as a training output."""
    from emoq.models.tiny import build_tiny

    model, processor = build_tiny(LABELS, lora={"r": 4}, seed=3)
    model.save_pretrained(folder / "weights")
    processor.save_pretrained(folder / "weights")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(model: Path):
    """`emoq serve` on 127.0.0.1 (default limits); yields its base URL, stops it with SIGTERM."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "emoq.cli", "serve", "--model", str(model), "--port", str(port),
                             "--device", "cpu", "--model-name", MODEL], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve_load: the server did not start")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


class Phase:
    """The well-behaved clients run until `stop` is set; their latencies, and what the bad clients got."""

    def __init__(self):
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.bad: dict[str, int] = {}
        self.lock = threading.Lock()


JSON = {"Content-Type": "application/json"}


def encoded(body: dict) -> bytes:
    """A request body serialized once: the load generator shares the server's CPUs, so it should cost
    as little of them as it can."""
    return json.dumps(body).encode()


def well_behaved(url: str, phase: Phase, clip: str) -> None:
    body = encoded({"audio": clip, "model": MODEL})
    with httpx.Client(base_url=url, timeout=300) as http:
        while not phase.stop.is_set():
            start = time.perf_counter()
            r = http.post("/v1/audio/emotion", content=body, headers=JSON)
            elapsed = time.perf_counter() - start
            with phase.lock:
                if r.status_code == 200:
                    phase.latencies.append(elapsed)
                else:
                    phase.errors.append(f"{r.status_code} {r.text[:120]}")


def long_prompts(url: str, stop, count, clip: str, patience: float) -> None:
    body = encoded(chat_body(clip, "why " * 25_000, max_tokens=512))  # a 100 KB question
    with httpx.Client(base_url=url, timeout=300) as http:
        while not stop.is_set():
            r = http.post("/v1/chat/completions", content=body, headers=JSON)
            code = r.json().get("error", {}).get("code") if r.status_code != 200 else "answered"
            count(f"100 KB question -> {r.status_code} {code}")


def abandoner(url: str, stop, count, clip: str, patience: float) -> None:
    body = chat_body(clip, "Describe the tone of the voice and the feeling.", max_tokens=512)
    streaming = True
    while not stop.is_set():
        if streaming:  # waits for the first chunk (the generation has started), then hangs up
            with httpx.Client(base_url=url, timeout=300) as http, \
                    http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))
            count("stream hung up after its first chunk")
        else:
            with httpx.Client(base_url=url, timeout=httpx.Timeout(300, read=patience)) as http:
                try:
                    http.post("/v1/chat/completions", json=body)
                    count("chat answered within the patience")
                except httpx.ReadTimeout:
                    count(f"chat abandoned after {patience:g} s")
        streaming = not streaming


BAD_CLIENTS = {"prompts": (long_prompts, 1), "abandon": (abandoner, 2)}  # name: (loop, seed of its clip)


def bad_client(name: str, url: str, patience: float, nice: int, stop, results) -> None:
    """One bad client in a process of its own, niced: it stands in for a client on another machine, so
    neither its CPU nor its share of a Python interpreter's lock should count against the server (or
    against the well-behaved clients' timing threads). What the server does for it counts in full."""
    os.nice(nice)
    counts: dict[str, int] = {}
    loop, seed = BAD_CLIENTS[name]
    loop(url, stop, lambda what: counts.update({what: counts.get(what, 0) + 1}), wav_b64(1.0, seed=seed), patience)
    results.put(counts)


def run_phase(url: str, seconds: float, clients: int, bad: tuple[str, ...] = (), patience: float = 0.1,
              nice: int = 10) -> Phase:
    phase = Phase()
    spawn = multiprocessing.get_context("spawn")
    stop, results = spawn.Event(), spawn.Queue()
    processes = [spawn.Process(target=bad_client, args=(name, url, patience, nice, stop, results)) for name in bad]
    for process in processes:
        process.start()
    clip = wav_b64(2.0)
    threads = [threading.Thread(target=well_behaved, args=(url, phase, clip)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    phase.stop.set()
    stop.set()
    for thread in threads:
        thread.join()
    for _ in processes:
        for what, n in results.get(timeout=300).items():
            phase.bad[what] = phase.bad.get(what, 0) + n
    for process in processes:
        process.join()
    return phase


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each phase (default 40)")
    parser.add_argument("--clients", type=int, default=8, help="well-behaved clients (default 8)")
    parser.add_argument("--patience", type=float, default=0.1,
                        help="seconds the abandoning client waits for a non-streaming chat before it hangs up "
                             "(default 0.1: it gives up while the chat waits in the queue)")
    parser.add_argument("--bad-clients", default="prompts,abandon",
                        help="which bad clients join the second phase (default prompts,abandon)")
    parser.add_argument("--bad-nice", type=int, default=10,
                        help="niceness of the bad clients' processes (default 10; 0: they compete for this "
                             "machine's CPUs with the server as equals)")
    args = parser.parse_args()
    bad = tuple(args.bad_clients.split(","))
    if not set(bad) <= set(BAD_CLIENTS):
        parser.error(f"--bad-clients: choose from {', '.join(BAD_CLIENTS)}")
    with tempfile.TemporaryDirectory() as tmp, server(save_tiny_model(Path(tmp))) as url:
        run_phase(url, 3.0, args.clients)  # warm-up
        phases = {"without bad clients": run_phase(url, args.seconds, args.clients),
                  "with bad clients": run_phase(url, args.seconds, args.clients, bad, args.patience, args.bad_nice)}
    print(f"emoq serve, tiny random model, {args.clients} well-behaved clients classifying a 2 s clip, "
          f"{args.seconds:g} s per phase, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| phase | requests | p50 s | p95 s | errors |\n|---|---:|---:|---:|---:|")
    for name, phase in phases.items():
        print(f"| {name} | {len(phase.latencies)} | {percentile(phase.latencies, 50):.3f} | "
              f"{percentile(phase.latencies, 95):.3f} | {len(phase.errors)} |")
    print(f"\nbad clients (nice {args.bad_nice}):")
    for what, n in sorted(phases["with bad clients"].bad.items()):
        print(f"  {n:5d} x {what} ({n / args.seconds:.1f}/s)")
    for name, phase in phases.items():
        for error in sorted(set(phase.errors))[:3]:
            print(f"  error ({name}): {error}")
    ratio = percentile(phases["with bad clients"].latencies, 95) / percentile(phases["without bad clients"].latencies, 95)
    print(f"\np95 with / without bad clients: {ratio:.2f} (acceptance: at most 2) -> {'ok' if ratio <= 2 else 'FAIL'}")


if __name__ == "__main__":
    main()
