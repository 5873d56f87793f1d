"""`emoq serve`: a real uvicorn server around a tiny random model, driven over HTTP with httpx.

Proves the OpenAI-compatible answers equal what `EmotionRecognizer` gives directly, that every bad
request gets the right 4xx in OpenAI's error shape (and the server keeps serving), that concurrent
clients get identical answers for identical input, and that a request without a transcript is
transcribed (and says so) when the model reads transcripts.
"""

import base64
import contextlib
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf
import uvicorn
from support.asr import CountingTranscriber

from emoq.cli import build_parser
from emoq.cli import main as cli
from emoq.cli.serve import run_serve
from emoq.inference import EmotionRecognizer
from emoq.models.tiny import build_tiny
from emoq.serve import create_app, stripped

LABELS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
MODEL = "emoq-tiny"
MAX_UPLOAD = 200_000


def wav_bytes(seconds: float, seed: int = 0) -> bytes:
    audio = (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def chat_body(audio_b64: str, question: str | None = "How does the speaker feel?", **extra) -> dict:
    parts = [{"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}}]
    if question is not None:
        parts.append({"type": "text", "text": question})
    return {"model": MODEL, "messages": [{"role": "user", "content": parts}], "max_tokens": 6, **extra}


CLIP = wav_bytes(1.0)


@pytest.fixture(scope="module")
def recognizer():
    model, processor = build_tiny(LABELS, lora={"r": 4}, seed=3)
    return EmotionRecognizer(model, processor, device="cpu")


@pytest.fixture(scope="module")
def client(recognizer):
    """An httpx client for a real uvicorn server (background thread, free port) serving the tiny model."""
    with serving(recognizer) as http:
        yield http


@contextlib.contextmanager
def serving(recognizer, **limits):
    """An httpx client for a real uvicorn server (background thread, free port) serving `recognizer`."""
    with served(create_app(recognizer, MODEL, max_upload_bytes=MAX_UPLOAD, **limits)) as http:
        yield http


@contextlib.contextmanager
def served(app):
    """An httpx client for a real uvicorn server (background thread, free port) serving `app`; the port is
    `http.port`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the server listens on this socket: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=sock.getsockname()[1], log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60) as http:
        http.port = sock.getsockname()[1]
        assert http.get("/health").status_code == 200
        yield http
    server.should_exit = True
    thread.join()
    sock.close()


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]


# ------------------------------------------------------------------ answers


def test_health_and_models_list(client):
    assert client.get("/health").json() == {"status": "ok", "model": MODEL, "labels": LABELS}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [(MODEL, "model")]


def test_chat_completion_answers_and_scores_the_clip(client, recognizer):
    r = client.post("/v1/chat/completions", json=chat_body(b64(CLIP), temperature=0.0))  # temperature: ignored
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == MODEL
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert message["content"] == recognizer.chat(CLIP, "How does the speaker feel?", max_new_tokens=6)
    assert out["choices"][0]["finish_reason"] == "stop"
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    emotion, direct = out["emotion"], recognizer.classify(CLIP)
    assert emotion["label"] in LABELS and emotion["label"] == direct["label"]
    assert sum(emotion["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert emotion["scores"] == pytest.approx(direct["scores"], abs=1e-6)
    assert (emotion["transcript"], emotion["transcript_source"]) == (None, "none")  # no text, no ASR model


def test_chat_without_text_asks_the_default_question_about_the_latest_clip(client, recognizer):
    other = wav_bytes(0.8, seed=5)
    body = chat_body(b64(other), question=None)
    body["messages"] = [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(CLIP)}}]},
                        {"role": "assistant", "content": "neutral"}, *body["messages"]]
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == recognizer.chat(other, None, max_new_tokens=6)
    assert r.json()["emotion"]["scores"] == pytest.approx(recognizer.classify(other)["scores"], abs=1e-6)


def test_streaming_gives_the_same_text_as_non_streaming(client):
    full = client.post("/v1/chat/completions", json=chat_body(b64(CLIP))).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/chat/completions", json=chat_body(b64(CLIP), stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full


@pytest.mark.parametrize("pieces", [[" \n", " Sad", "ness ", " and", " joy\n", " "], ["joy"], [" ", "\n"], [],
                                    ["a ", "", " b", "  "]])
def test_stripped_stream_is_the_stripped_answer(pieces):
    """Streamed pieces are trimmed on the fly, so that they add up to the non-streaming (stripped) answer."""
    out = list(stripped(iter(pieces)))
    assert "".join(out) == "".join(pieces).strip()
    assert all(out)  # no empty chunks


def test_a_client_leaving_mid_stream_does_not_disturb_the_next_request(client, recognizer):
    with client.stream("POST", "/v1/chat/completions", json=chat_body(b64(CLIP), stream=True, max_tokens=32)) as r:
        assert next(r.iter_lines()).startswith("data: ")  # then hang up
    r = client.post("/v1/audio/emotion", json={"audio": b64(CLIP)})
    assert r.status_code == 200 and r.json()["scores"] == pytest.approx(recognizer.classify(CLIP)["scores"], abs=1e-6)


def test_audio_emotion_equals_classify_batch(client, recognizer):
    clips = [CLIP, wav_bytes(0.6, seed=1)]
    expected = recognizer.classify_batch(clips, ["the weather report", None])
    for clip, text, want in zip(clips, ["the weather report", None], expected):
        r = client.post("/v1/audio/emotion", json={"audio": b64(clip), "format": "wav", "text": text, "model": MODEL})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["label"] == want["label"] and out["model"] == MODEL
        assert out["scores"] == pytest.approx(want["scores"], abs=1e-6)
        # no ASR model here: the text given is read ("gold"), a request without one reads none
        assert (out["transcript"], out["transcript_source"]) == (text, "gold" if text else "none")


def test_a_request_without_text_is_transcribed_once_and_says_so(recognizer):
    asr = CountingTranscriber()
    model, processor = build_tiny(LABELS, lora={"r": 4}, seed=3)
    with_asr = EmotionRecognizer(model, processor, device="cpu", transcriber=asr)
    with serving(with_asr) as http:
        r = http.post("/v1/audio/emotion", json={"audio": b64(CLIP), "format": "wav"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["transcript"], out["transcript_source"]) == ("heard 16000 samples", "asr")
        assert asr.calls == [[16000]]
        # scored with the transcribed words, as if they had been sent
        assert out["scores"] == pytest.approx(recognizer.classify(CLIP, text="heard 16000 samples")["scores"],
                                              abs=1e-6)
        r = http.post("/v1/audio/emotion", json={"audio": b64(CLIP), "text": "the weather report"})
        assert (r.json()["transcript"], r.json()["transcript_source"]) == ("the weather report", "gold")
        assert len(asr.calls) == 1

        r = http.post("/v1/chat/completions", json=chat_body(b64(CLIP)))  # answer and scores: one transcription
        assert r.status_code == 200, r.text
        emotion = r.json()["emotion"]
        assert (emotion["transcript"], emotion["transcript_source"]) == ("heard 16000 samples", "asr")
        assert asr.calls == [[16000]] * 2
        assert r.json()["choices"][0]["message"]["content"] == recognizer.chat(
            CLIP, "How does the speaker feel?", text="heard 16000 samples", max_new_tokens=6)
        r = http.post("/v1/chat/completions", json=chat_body(b64(CLIP), stream=True))
        assert r.status_code == 200 and sse_events(r)[-1] == "[DONE]" and len(asr.calls) == 3


# ------------------------------------------------------------------ bad requests

BIG_CLIP = wav_bytes(7.0)  # 224 kB of wav, ~300 kB as base64: over the test server's 200 kB limit
BAD_REQUESTS = {
    "malformed base64": ("/v1/chat/completions", chat_body("this is *not* base64!"), 400, "invalid_base64"),
    "a path instead of bytes": ("/v1/audio/emotion", {"audio": "/etc/passwd"}, 400, "invalid_base64"),
    "text bytes in chat": ("/v1/chat/completions", chat_body(b64(b"hello world")), 400, "invalid_audio"),
    "text bytes": ("/v1/audio/emotion", {"audio": b64(b"hello world")}, 400, "invalid_audio"),
    "empty audio": ("/v1/audio/emotion", {"audio": ""}, 400, "invalid_audio"),
    "odd format": ("/v1/audio/emotion", {"audio": b64(CLIP), "format": "../wav"}, 400, "invalid_audio_format"),
    "messages is a number": ("/v1/chat/completions", {**chat_body(b64(CLIP)), "messages": 5}, 400, "invalid_request"),
    "max_tokens is a word": ("/v1/chat/completions", chat_body(b64(CLIP), max_tokens="many"), 400, "invalid_request"),
    "max_tokens too large": ("/v1/chat/completions", chat_body(b64(CLIP), max_tokens=100_000), 400,
                             "invalid_max_tokens"),
    "max_completion_tokens 0": ("/v1/chat/completions", chat_body(b64(CLIP), max_completion_tokens=0), 400,
                                "invalid_max_tokens"),
    "unknown part type": ("/v1/chat/completions", {**chat_body(b64(CLIP)), "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
        "invalid_request"),
    "no model field": ("/v1/chat/completions", {"messages": chat_body(b64(CLIP))["messages"]}, 400, "invalid_request"),
    "unknown model": ("/v1/chat/completions", {**chat_body(b64(CLIP)), "model": "gpt-4o"}, 404, "model_not_found"),
    "unknown model, emotion": ("/v1/audio/emotion", {"audio": b64(CLIP), "model": "gpt-4o"}, 404, "model_not_found"),
    "input_audio part without audio": ("/v1/chat/completions", {**chat_body(b64(CLIP)), "messages": [
        {"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "invalid_request"),
    "no audio part": ("/v1/chat/completions", {**chat_body(b64(CLIP)), "messages": [
        {"role": "user", "content": "How does the speaker feel?"}]}, 400, "missing_audio"),
    "no user message": ("/v1/chat/completions", {**chat_body(b64(CLIP)), "messages": [
        {"role": "assistant", "content": chat_body(b64(CLIP))["messages"][0]["content"]}]}, 400,
        "missing_user_message"),
    "oversize body": ("/v1/chat/completions", chat_body(b64(BIG_CLIP)), 413, "request_too_large"),
    "the audio placeholder in the question": ("/v1/chat/completions", chat_body(b64(CLIP), "what of <|emoq|>?"), 400,
                                              "invalid_request"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_json_error_and_the_server_keeps_serving(client, case):
    path, body, status, code = BAD_REQUESTS[case]
    message = assert_error(client.post(path, json=body), status, code)
    if code == "invalid_audio":
        assert "not a decodable audio file" in message or "empty file" in message
    if case == "messages is a number":
        assert message.startswith("messages:")
    if case == "unknown part type":
        assert message.startswith("messages.0.content.list[ContentPart].0.type: Input should be 'text' or")
    assert client.get("/health").status_code == 200


def test_raw_body_errors(client):
    """Bodies that never reach validation: not JSON, not a JSON object, too large (with or without a
    Content-Length); plus routes and methods that do not exist."""
    headers = {"Content-Type": "application/json"}
    message = assert_error(client.post("/v1/audio/emotion", content=b'{"audio": ', headers=headers), 400, "invalid_json")
    assert "invalid JSON" in message
    assert_error(client.post("/v1/audio/emotion", content=b"[1, 2]", headers=headers), 400, "invalid_request")
    assert_error(client.post("/v1/audio/emotion", content=b"", headers=headers), 400, "invalid_request")
    big = json.dumps({"audio": b64(BIG_CLIP)}).encode()
    assert_error(client.post("/v1/audio/emotion", content=big, headers=headers), 413, "request_too_large")
    chunked = (big[i : i + 16384] for i in range(0, len(big), 16384))  # no Content-Length: counted as it arrives
    assert_error(client.post("/v1/audio/emotion", content=chunked, headers=headers), 413, "request_too_large")
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/audio/emotion"), 405, "method_not_allowed")
    assert client.get("/health").status_code == 200


def test_a_model_failure_is_a_500_and_the_server_keeps_serving(client, recognizer, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(recognizer, "classify_batch", boom)
    assert "out of memory (simulated)" in assert_error(
        client.post("/v1/audio/emotion", json={"audio": b64(CLIP)}), 500, "internal_error")
    monkeypatch.setattr(recognizer.model, "generate", boom)
    r = client.post("/v1/chat/completions", json=chat_body(b64(CLIP), stream=True))
    assert r.status_code == 200  # the headers were out before the failure: it arrives as an error event
    error = json.loads(sse_events(r)[-1])["error"]
    assert error["type"] == "server_error" and "out of memory (simulated)" in error["message"]
    monkeypatch.undo()
    assert client.get("/health").status_code == 200
    assert client.post("/v1/audio/emotion", json={"audio": b64(CLIP)}).status_code == 200


# ------------------------------------------------------------------ load


def test_200_concurrent_requests_all_succeed_with_identical_answers(client, recognizer):
    clips = [wav_bytes(0.5, seed=s) for s in range(4)]
    expected = recognizer.classify_batch(clips)

    def ask(i: int) -> tuple[int, int, dict]:
        r = client.post("/v1/audio/emotion", json={"audio": b64(clips[i % 4])})
        return i % 4, r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(ask, range(200)))
    assert [status for _, status, _ in results] == [200] * 200
    for k in range(4):
        answers = [out for i, _, out in results if i == k]
        assert all(a == answers[0] for a in answers)  # identical input, identical answer
        assert answers[0]["label"] == expected[k]["label"]
        assert answers[0]["scores"] == pytest.approx(expected[k]["scores"], abs=1e-6)


# ------------------------------------------------------------------ CLI


def test_serve_help_names_the_endpoints_and_defaults_to_localhost(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for endpoint in ("/health", "/v1/models", "/v1/chat/completions", "/v1/audio/emotion", "--max-upload-mb",
                     "--max-concurrent-uploads", "--max-prompt-tokens", "truncate_prompt", "--max-queue",
                     "--request-timeout", "--api-key", "EMOQ_API_KEY", "--shutdown-timeout", "truncated_to"):
        assert endpoint in text
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.model_name, args.func) == ("127.0.0.1", 8000, "emoq", run_serve)


def test_run_serve_loads_the_model_and_starts_uvicorn(tmp_path, monkeypatch, capsys):
    model, processor = build_tiny(LABELS, lora={"r": 4}, seed=3)
    model.save_pretrained(tmp_path / "weights")
    processor.save_pretrained(tmp_path / "weights")
    calls = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: calls.append((self.config.app, self.config)))
    assert cli(["serve", "--model", str(tmp_path), "--device", "cpu", "--model-name", "x", "--max-upload-mb", "1"]) == 0
    (app, config), = calls
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.timeout_graceful_shutdown > 10  # a backstop: the app's own deadline comes first
    assert {"/health", "/v1/models", "/v1/chat/completions", "/v1/audio/emotion"} <= {r.path for r in app.routes}
    assert cli(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "emoq serve: error: " in (err := capsys.readouterr().err) and "no EmoQ model here" in err
