"""`emoq serve` under clients that misbehave, driven over HTTP as a user meets it.

Proves that a question (or a transcript) over the prompt budget is refused (400 naming the limit and
its length) or cut from the left on request; that work nobody waits for is dropped (a hung-up request never runs, a
hung-up generation stops between decoding steps), that the model queue is bounded (503 + Retry-After
when full or past its deadline) and so are the uploads held in memory; that an API key guards every
endpoint but /health and a public address needs one; that a foreign or broken model config, a lone
UTF-16 surrogate and SIGTERM (work in flight finishes, what is left at the deadline gets a 503) each end
cleanly; and that a clip cut to 30 s says so.
"""

import contextlib
import hmac
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient
from test_serve import (
    CLIP,
    LABELS,
    MODEL,
    assert_error,
    b64,
    chat_body,
    served,
    serving,
    sse_events,
    wav_bytes,
)

from emoq.cli import main as cli
from emoq.inference import EmotionRecognizer
from emoq.models.tiny import build_tiny, tiny_bert_config
from emoq.serve import MAX_TOKENS_LIMIT, create_app
from emoq.serve_limits import PromptBudget

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recognizer():
    model, processor = build_tiny(LABELS, lora={"r": 4}, seed=3)
    return EmotionRecognizer(model, processor, device="cpu")


def wait_for(condition, what: str, timeout: float = 60) -> None:
    """Poll `condition` until it holds (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def send_and_hang_up(port: int, path: str, body: dict, until) -> None:
    """POST `body` over a plain socket, wait for `until()`, then close the connection unanswered."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + data)
        wait_for(until, "the server to take the request")


@contextlib.contextmanager
def model_held(recognizer, monkeypatch):
    """The first classification keeps the model thread busy until `release` is set; `calls` holds the
    length of each clip classified, in order."""
    release, calls = threading.Event(), []
    classify = recognizer.classify_batch

    def held(clips, texts=None, **kwargs):
        calls.append(len(clips[0]))
        if len(calls) == 1:
            release.wait(60)
        return classify(clips, texts, **kwargs)

    monkeypatch.setattr(recognizer, "classify_batch", held)
    try:
        yield release, calls
    finally:
        release.set()


@contextlib.contextmanager
def slow_steps(recognizer, seconds: float = 0.01):
    """Each LLM step sleeps `seconds` and picks the word " joy": a generation runs to max_tokens unless it
    is stopped. Yields the list of steps taken."""
    head = recognizer.model.language_model.get_output_embeddings()
    token = recognizer.processor.tokenizer(" joy", add_special_tokens=False)["input_ids"][-1]
    steps = []

    def hook(module, args, output):
        steps.append(1)
        time.sleep(seconds)
        forced = torch.full_like(output, -1e4)
        forced[..., token] = 0.0
        return forced

    handle = head.register_forward_hook(hook)
    try:
        yield steps
    finally:
        handle.remove()


def emotion_body(clip: bytes = CLIP, **extra) -> dict:
    return {"audio": b64(clip), **extra}


# ------------------------------------------------------------------ prompt budget


def test_a_100_kb_question_is_refused_by_its_length_before_tokenizing(recognizer, monkeypatch):
    app = create_app(recognizer, MODEL)
    budget = app.state.budget
    context = recognizer.model.config.text_config.max_position_embeddings
    assert budget.limit == context - budget.frame - MAX_TOKENS_LIMIT > 0  # derived from the LLM's context
    tokenized = []
    monkeypatch.setattr(budget, "_offsets", lambda text: tokenized.append(len(text)) or [])
    with served(app) as http:
        question = "why " * 25_000
        message = assert_error(http.post("/v1/chat/completions", json=chat_body(b64(CLIP), question)), 400,
                               "context_length_exceeded")
        assert f"{len(question.strip())} characters long" in message
        assert f"at most {budget.limit} tokens" in message and "--max-prompt-tokens" in message
        assert tokenized == []
        message = assert_error(http.post("/v1/audio/emotion", json=emotion_body(text=question)), 400,
                               "context_length_exceeded")  # a transcript goes into the prompt as well
        assert message.startswith('"text" (the transcript read with the clip) is 100000 characters long')
        assert tokenized == []
        assert http.get("/health").status_code == 200


def test_a_question_over_the_budget_names_its_token_count_or_is_cut_from_the_left(recognizer):
    question = "the weather report said it would rain tomorrow and I will take the train at noon"
    tokens = len(recognizer.processor.tokenizer(question, add_special_tokens=False)["input_ids"])
    assert tokens > 8 and len(question) < 8 * PromptBudget.MAX_CHARS_PER_TOKEN
    with serving(recognizer, max_prompt_tokens=8) as http:
        message = assert_error(http.post("/v1/chat/completions", json=chat_body(b64(CLIP), question)), 400,
                               "context_length_exceeded")
        assert f"is {tokens} tokens long" in message and "at most 8 tokens" in message and "truncate_prompt" in message
        message = assert_error(http.post("/v1/audio/emotion", json=emotion_body(text=question)), 400,
                               "context_length_exceeded")
        assert f"is {tokens} tokens long" in message and "truncate_prompt" not in message
        assert http.post("/v1/audio/emotion", json=emotion_body(text="the weather report")).status_code == 200

        cut = http.post("/v1/chat/completions", json=chat_body(b64(CLIP), question, truncate_prompt="left"))
        assert cut.status_code == 200, cut.text
        kept = cut.json()["prompt_truncated"]
        assert 0 < kept["kept_tokens"] <= 8 and kept["dropped_characters"] > 0
        tail = question[kept["dropped_characters"]:]
        assert question.endswith(tail) and len(recognizer.processor.tokenizer(tail)["input_ids"]) == kept["kept_tokens"]
        same = http.post("/v1/chat/completions", json=chat_body(b64(CLIP), tail))  # as if the client sent the tail
        assert same.status_code == 200 and same.json()["prompt_truncated"] is None
        assert cut.json()["choices"] == same.json()["choices"] and cut.json()["usage"] == same.json()["usage"]

        huge = http.post("/v1/chat/completions", json=chat_body(b64(CLIP), "why " * 25_000, truncate_prompt="left"))
        assert huge.status_code == 200 and 0 < huge.json()["prompt_truncated"]["kept_tokens"] <= 8
        assert_error(http.post("/v1/chat/completions", json=chat_body(b64(CLIP), truncate_prompt="right")), 400,
                     "invalid_request")


def test_a_larger_max_tokens_leaves_less_room_for_the_question(recognizer):
    app = create_app(recognizer, MODEL, max_prompt_tokens=10_000)  # more than the LLM's context holds
    budget = app.state.budget
    room = recognizer.model.config.text_config.max_position_embeddings - budget.frame
    question = "rain " * (room - 100)
    with served(app) as http:
        assert http.post("/v1/chat/completions", json=chat_body(b64(CLIP), question, max_tokens=4)).status_code == 200
        message = assert_error(http.post("/v1/chat/completions", json=chat_body(b64(CLIP), question, max_tokens=500)),
                               400, "context_length_exceeded")
        assert f"at most {room - 500} tokens" in message


# ------------------------------------------------------------------ the model queue


def test_a_full_queue_answers_503_with_retry_after(recognizer, monkeypatch):
    with model_held(recognizer, monkeypatch) as (release, calls), serving(recognizer, max_queue=1) as http, \
            ThreadPoolExecutor(1) as pool:
        first = pool.submit(http.post, "/v1/audio/emotion", json=emotion_body())
        wait_for(lambda: calls, "the first classification to start")
        r = http.post("/v1/audio/emotion", json=emotion_body())
        assert "--max-queue 1" in assert_error(r, 503, "queue_full")
        assert int(r.headers["Retry-After"]) >= 1
        r = http.post("/v1/chat/completions", json=chat_body(b64(CLIP), stream=True))
        assert_error(r, 503, "queue_full")  # a stream is refused with a status code too, not mid-stream
        release.set()
        assert first.result().status_code == 200
        assert http.post("/v1/audio/emotion", json=emotion_body()).status_code == 200
        assert len(calls) == 2


def test_a_request_past_its_deadline_gets_503_and_never_runs(recognizer, monkeypatch):
    late = wav_bytes(0.7, seed=7)
    with model_held(recognizer, monkeypatch) as (release, calls), serving(recognizer, request_timeout=0.5) as http, \
            ThreadPoolExecutor(1) as pool:
        first = pool.submit(http.post, "/v1/audio/emotion", json=emotion_body())
        wait_for(lambda: calls, "the first classification to start")
        r = http.post("/v1/audio/emotion", json=emotion_body(late))
        assert "--request-timeout" in assert_error(r, 503, "queue_timeout")
        assert int(r.headers["Retry-After"]) >= 1
        release.set()
        assert first.result().status_code == 200
        assert http.post("/v1/audio/emotion", json=emotion_body()).status_code == 200
        assert calls == [16000, 16000]  # the late clip (11200 samples) was never classified


def test_chats_whose_clients_hung_up_while_queued_never_run(recognizer, monkeypatch):
    generated = []
    generate = recognizer.model.generate
    monkeypatch.setattr(recognizer.model, "generate", lambda **kw: generated.append(1) or generate(**kw))
    app = create_app(recognizer, MODEL)
    worker = app.state.worker
    with model_held(recognizer, monkeypatch) as (release, calls), served(app) as http, ThreadPoolExecutor(1) as pool:
        first = pool.submit(http.post, "/v1/audio/emotion", json=emotion_body())
        wait_for(lambda: calls, "the first classification to start")
        for stream in (False, False, True, False):  # four chats, each abandoned while it waits
            send_and_hang_up(http.port, "/v1/chat/completions", chat_body(b64(CLIP), max_tokens=512, stream=stream),
                             until=lambda: worker.pending == 2)
            wait_for(lambda: worker.pending == 1, "the server to drop the abandoned chat")
        release.set()
        assert first.result().status_code == 200
        r = http.post("/v1/audio/emotion", json=emotion_body())
        assert r.status_code == 200 and len(calls) == 2
    assert generated == []


def test_a_stream_whose_client_left_stops_between_decoding_steps(recognizer):
    app = create_app(recognizer, MODEL)
    with slow_steps(recognizer) as steps, served(app) as http:
        body = chat_body(b64(CLIP), stream=True, max_tokens=MAX_TOKENS_LIMIT)
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            assert len([next(events) for _ in range(3)]) == 3  # the role chunk, then words: hang up
        wait_for(lambda: app.state.worker.pending == 0, "the generation to end")
        assert 0 < len(steps) < MAX_TOKENS_LIMIT
        assert http.post("/v1/audio/emotion", json=emotion_body()).status_code == 200


def test_a_running_chat_whose_client_left_stops_between_decoding_steps(recognizer):
    app = create_app(recognizer, MODEL)
    with slow_steps(recognizer) as steps, served(app) as http:
        send_and_hang_up(http.port, "/v1/chat/completions", chat_body(b64(CLIP), max_tokens=MAX_TOKENS_LIMIT),
                         until=lambda: len(steps) > 2)
        wait_for(lambda: app.state.worker.pending == 0, "the generation to end")
        assert len(steps) < MAX_TOKENS_LIMIT


# ------------------------------------------------------------------ who may call, how much is held


def test_an_api_key_guards_every_endpoint_but_health(recognizer, monkeypatch):
    compared = []
    compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or compare(a, b))
    with serving(recognizer, api_key="s3cret") as http:
        assert http.get("/health").status_code == 200
        for path in ("/v1/models", "/docs", "/v1/nothing"):
            r = http.get(path)
            assert "missing API key" in assert_error(r, 401, "invalid_api_key")
            assert r.headers["WWW-Authenticate"] == "Bearer"
        assert "invalid API key" in assert_error(http.get("/v1/models", headers={"Authorization": "Bearer s3cre"}),
                                                 401, "invalid_api_key")
        assert_error(http.get("/v1/models", headers={"Authorization": "s3cret"}), 401, "invalid_api_key")
        big = {"audio": "A" * 500_000}  # over the upload limit: refused for the key, before the body is read
        assert_error(http.post("/v1/audio/emotion", json=big), 401, "invalid_api_key")
        key = {"Authorization": "Bearer s3cret"}
        assert http.get("/v1/models", headers=key).status_code == 200
        assert http.post("/v1/audio/emotion", json=emotion_body(), headers=key).status_code == 200
        assert_error(http.post("/v1/audio/emotion", json=big, headers=key), 413, "request_too_large")
    assert compared


def test_uploads_held_in_memory_are_capped(recognizer, monkeypatch):
    upload = wav_bytes(3.5, seed=2)  # ~150 kB as JSON: two fit in 2 x 200 kB, a third does not
    app = create_app(recognizer, MODEL, max_upload_bytes=200_000, max_concurrent_uploads=2)
    with model_held(recognizer, monkeypatch) as (release, calls), served(app) as http, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(http.post, "/v1/audio/emotion", json=emotion_body(upload)) for _ in range(2)]
        wait_for(lambda: app.state.worker.pending == 2, "both uploads to wait for the model")
        r = http.post("/v1/audio/emotion", json=emotion_body(upload))
        assert "--max-concurrent-uploads" in assert_error(r, 503, "too_many_uploads")
        assert r.headers["Retry-After"] == "1"
        assert http.get("/health").status_code == 200
        release.set()
        assert [f.result().status_code for f in held] == [200, 200]
        assert http.post("/v1/audio/emotion", json=emotion_body(upload)).status_code == 200


def serve_cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """`emoq serve ...` as a user runs it: a separate process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "emoq.cli", "serve", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def one_line_exit(proc: subprocess.Popen) -> str:
    """The process's one-line complaint: it exited non-zero, without a traceback."""
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None), stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_public_address_needs_an_api_key(saved_model, monkeypatch):
    line = one_line_exit(serve_cli("--model", str(saved_model), "--host", "0.0.0.0", env={"EMOQ_API_KEY": ""}))
    assert "refusing to listen on 0.0.0.0 without an API key" in line and "EMOQ_API_KEY" in line

    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: started.append(self.config))
    monkeypatch.setenv("EMOQ_API_KEY", "from-the-env")
    assert cli(["serve", "--model", str(saved_model), "--host", "0.0.0.0", "--device", "cpu"]) == 0
    config, = started
    app = config.app
    assert config.host == "0.0.0.0"
    http = TestClient(app)
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers={"Authorization": "Bearer from-the-env"}).status_code == 200


# ------------------------------------------------------------------ bad model folders, bad text


@pytest.mark.parametrize("config, problem", [
    (tiny_bert_config(100).to_json_string(), "describes a 'bert' model, not an emoq model"),
    ('{"model_type": "emoq", "audio_config": ', "not valid JSON (Expecting value: line 1 column 40"),
    ("[1, 2]", "describes no model_type"),
    ('{"hidden_size": 8}', "describes no model_type"),
])
def test_serve_on_a_foreign_or_broken_config_exits_with_one_line(tmp_path, config, problem):
    (tmp_path / "config.json").write_text(config, encoding="utf-8")
    line = one_line_exit(serve_cli("--model", str(tmp_path)))
    assert str(tmp_path / "config.json") in line and problem in line, line


def test_a_lone_surrogate_is_a_400_that_names_the_field(recognizer):
    body = json.dumps(chat_body(b64(CLIP), "how do they feel? \ud83d\ude00 ?"))  # JSON: a \\uXXXX pair, an emoji
    headers = {"Content-Type": "application/json"}
    with serving(recognizer) as http:
        for field, lone in [("messages.0.content.1.text", "\\ud800"), ("model", "\\udfff")]:
            raw = body.replace("\\ud83d\\ude00", lone) if field.startswith("messages") else \
                body.replace(f'"model": "{MODEL}"', f'"model": "emo{lone}"')
            message = assert_error(http.post("/v1/chat/completions", content=raw.encode(), headers=headers), 400,
                                   "invalid_unicode")
            assert message.startswith(f"{field}: text holds a lone UTF-16 surrogate ({lone} at character"), message
        raw = json.dumps(emotion_body(text="rain")).replace('"rain"', '"rain \\udc00"').encode()
        r = http.post("/v1/audio/emotion", content=raw, headers=headers)
        assert assert_error(r, 400, "invalid_unicode").startswith("text:")
        r = http.post("/v1/chat/completions", content=body.encode(), headers=headers)
        assert r.status_code == 200, r.text  # a proper pair is fine


# ------------------------------------------------------------------ audio cut to 30 s


def long_wav(seconds: float) -> bytes:
    """A clip at 8 kHz (smaller upload; the server resamples it)."""
    audio = (np.random.default_rng(1).standard_normal(int(8000 * seconds)) * 0.1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, 8000, format="WAV")
    return buf.getvalue()


def test_a_clip_over_30_s_says_it_was_cut(recognizer):
    app = create_app(recognizer, MODEL, max_upload_bytes=2_000_000)
    long = long_wav(31.0)
    with served(app) as http:
        r = http.post("/v1/audio/emotion", json=emotion_body(long))
        assert r.status_code == 200, r.text
        assert r.json()["truncated_to"] == 30.0
        assert http.post("/v1/audio/emotion", json=emotion_body()).json()["truncated_to"] is None
        r = http.post("/v1/chat/completions", json=chat_body(b64(long)))
        assert r.status_code == 200 and r.json()["truncated_to"] == 30.0
        r = http.post("/v1/chat/completions", json=chat_body(b64(long), stream=True))
        first = json.loads(sse_events(r)[0])
        assert first["truncated_to"] == 30.0 and first["choices"][0]["delta"]["role"] == "assistant"
        assert http.post("/v1/chat/completions", json=chat_body(b64(CLIP))).json()["truncated_to"] is None


# ------------------------------------------------------------------ SIGTERM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def cli_server(model: Path, *args: str):
    """A real `emoq serve` process on a free loopback port; yields (process, httpx client)."""
    port = free_port()
    proc = serve_cli("--model", str(model), "--port", str(port), "--device", "cpu", "--model-name", MODEL, *args)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            def up() -> bool:
                assert proc.poll() is None, proc.communicate()[1]
                with contextlib.suppress(httpx.TransportError):
                    return http.get("/health").status_code == 200
                return False

            wait_for(up, "the server to start", timeout=180)
            yield proc, http
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stream_to_end(http: httpx.Client, started: threading.Event | None = None, **extra) -> tuple[int, list[str]]:
    """(status, data lines) of one streamed chat, as far as the server sent them before closing."""
    lines, status = [], None
    with contextlib.suppress(httpx.TransportError), \
            http.stream("POST", "/v1/chat/completions", json=chat_body(b64(CLIP), stream=True, **extra)) as r:
        status = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[len("data: "):])
                if started is not None:
                    started.set()
    return status, lines


def test_sigterm_lets_work_in_flight_finish_and_exits_0(saved_model):
    with cli_server(saved_model, "--shutdown-timeout", "60") as (proc, http), ThreadPoolExecutor(2) as pool:
        started = threading.Event()
        stream = pool.submit(stream_to_end, http, started, max_tokens=200)
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        status, lines = stream.result(timeout=120)
        assert status == 200 and lines[-1] == "[DONE]"  # it finished after the signal
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
        with pytest.raises(httpx.ConnectError):
            http.get("/health")


def test_sigterm_cancels_what_is_left_at_the_shutdown_deadline_and_exits_0(saved_model):
    with cli_server(saved_model, "--shutdown-timeout", "1") as (proc, http), ThreadPoolExecutor(12) as pool:
        started = threading.Event()
        # twelve long generations, one after the other on the model thread: far more than a second of work
        streams = [pool.submit(stream_to_end, http, started if i == 0 else None, max_tokens=MAX_TOKENS_LIMIT)
                   for i in range(12)]
        assert started.wait(60)
        time.sleep(0.5)  # the others reach the queue
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr and "Cancel" not in stderr  # no request was left to uvicorn to kill
        ends = [s.result(timeout=60) for s in streams]
    finished = [lines for status, lines in ends if status == 200 and lines[-1] == "[DONE]"]
    cut = [lines for status, lines in ends if status == 200 and lines[-1] != "[DONE]"]
    refused = [lines for status, lines in ends if status == 503]  # queued at the deadline: never run
    unheard = [lines for status, lines in ends if status is None]  # not yet read when the server stopped listening
    assert len(finished) + len(cut) + len(refused) + len(unheard) == 12 and refused
    for lines in cut:  # the one running at the deadline: an error event, not a silently short answer
        assert json.loads(lines[-1])["error"]["code"] == "shutting_down"
