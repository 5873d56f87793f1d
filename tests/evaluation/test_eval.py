"""`emoq eval`: every row reported, metrics that agree with scikit-learn, batch-size invariance,
free-text answers mapped through aliases (unmappable ones counted), sharding over processes, and the
transcripts used (gold, asr, none) stamped into the protocol and every row."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
)
from support.corpora import TONES, make_tone_corpus
from support.environment import tail

from emoq.cli import main as cli
from emoq.evaluation.runner import map_answer
from emoq.inference import EmotionRecognizer
from emoq.labels import UNMAPPED, get_label_set

REPO = Path(__file__).resolve().parents[2]
BROKEN = "test/dia5_utt0"  # one non-audio clip: an error row that must travel through every path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """18 rows (6 per tone class) in MELD layout, one of them not audio: 17 scorable rows."""
    root = make_tone_corpus(tmp_path_factory.mktemp("tones"), {"test": 6})
    (root / "output_repeated_splits_test" / "dia5_utt0.wav").write_bytes(b"not audio, just text")
    return root


@pytest.fixture(scope="module")
def audio_model(saved_model, tmp_path_factory):
    """saved_model with its speech path amplified (Q-Former cross-attention v/out x30, LLM attention q/k x5,
    v/o x10): a random tiny model's scores hardly depend on the audio (they vary ~1e-7 between clips, as
    much as batching noise), which would let row mix-ups pass unseen; here they vary ~1e-4 between clips
    and greedy answers differ between clips."""
    import torch

    from emoq.models import EmoQForConditionalGeneration, EmoQProcessor

    model = EmoQForConditionalGeneration.from_pretrained(saved_model / "weights")
    gains = {"cross_attention.v.weight": 30, "cross_attention.out.weight": 30, "q_proj.base_layer.weight": 5,
             "k_proj.base_layer.weight": 5, "v_proj.base_layer.weight": 10, "o_proj.base_layer.weight": 10}
    with torch.no_grad():
        for name, param in model.named_parameters():
            gain = next((g for suffix, g in gains.items() if name.endswith(suffix)), None)
            if gain is not None:
                param.mul_(gain)
    path = tmp_path_factory.mktemp("audio_model")
    model.save_pretrained(path / "weights")
    EmoQProcessor.from_pretrained(saved_model / "weights").save_pretrained(path / "weights")
    return path


@pytest.fixture(scope="module")
def eval_out(audio_model, corpus, tmp_path_factory):
    """out folder of `emoq eval --model audio_model ... OPTIONS` on the corpus (each option set runs once)."""
    done = {}

    def run(*options: str) -> Path:
        if options not in done:
            out = tmp_path_factory.mktemp("eval")
            assert cli(["eval", "--model", str(audio_model), "--dataset", "meld", "--root", str(corpus),
                        "--split", "test", "--out", str(out), *options]) == 0
            done[options] = out
        return done[options]

    return run


def read_outputs(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows, json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def assert_metrics_match_sklearn(out: Path) -> None:
    """metrics.json recomputed with scikit-learn from predictions.jsonl alone (1e-9), every figure."""
    rows, m = read_outputs(out)
    labels = m["protocol"]["classes"]
    scored = [r for r in rows if r["status"] == "ok" and r["gold"] is not None]
    gold, pred = [r["gold"] for r in scored], [r["pred"] for r in scored]
    assert m["num_samples"] == m["rows_ok"] == len(scored) > 0
    assert abs(m["accuracy"] - accuracy_score(gold, pred)) < 1e-9
    in_gold = [c for c in labels if c in set(gold)]
    assert abs(m["unweighted_accuracy"] - np.mean(recall_score(gold, pred, labels=in_gold, average=None))) < 1e-9
    assert abs(m["weighted_f1"] - f1_score(gold, pred, labels=labels, average="weighted", zero_division=0)) < 1e-9
    occurring = [c for c in labels if c in set(gold) | set(pred)]
    assert abs(m["macro_f1"] - f1_score(gold, pred, labels=occurring, average="macro", zero_division=0)) < 1e-9
    prec, rec, f1, support = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    assert list(m["per_class"]) == labels
    for i, c in enumerate(labels):
        got = m["per_class"][c]
        assert abs(got["precision"] - prec[i]) < 1e-9 and abs(got["recall"] - rec[i]) < 1e-9, c
        assert abs(got["f1"] - f1[i]) < 1e-9 and got["support"] == support[i], c
    outside = sorted({p for p in pred if p not in labels})
    cm = confusion_matrix(gold, pred, labels=labels + outside)[: len(labels)]
    cm = np.concatenate([cm[:, : len(labels)], cm[:, len(labels):].sum(axis=1, keepdims=True)], axis=1)
    if not outside:
        cm = cm[:, : len(labels)]
    assert m["confusion_matrix"] == cm.tolist()
    assert m["confusion_matrix_columns"] == labels + ([UNMAPPED] if outside else [])
    assert m["num_unknown_predictions"] == sum(p not in labels for p in pred)


# ---------------------------------------------------------------- every row, errors, exit status


def test_eval_reports_every_row_and_metrics_match_sklearn(saved_model, tmp_path):
    root = make_tone_corpus(tmp_path / "corpus", {"test": 4})
    clips = root / "output_repeated_splits_test"
    (clips / "dia0_utt0.wav").write_bytes(b"this is not audio at all")  # non-audio bytes
    (clips / "dia1_utt0.wav").unlink()  # missing clip
    (clips / "dia2_utt0.wav").write_bytes(b"")  # empty file
    out = tmp_path / "eval"
    assert cli(["eval", "--model", str(saved_model), "--dataset", "meld", "--root", str(root), "--split", "test",
                "--out", str(out), "--batch-size", "5"]) == 0
    rows, metrics = read_outputs(out)
    assert len(rows) == 12  # every CSV row, errors included
    errors = {r["key"]: r["error"] for r in rows if r["status"] == "error"}
    assert set(errors) == {"test/dia0_utt0", "test/dia1_utt0", "test/dia2_utt0"}
    assert all(("dia" in msg) for msg in errors.values()), errors  # messages name the file
    assert metrics["rows_ok"] == 9 and metrics["rows_error"] == 3
    assert_metrics_match_sklearn(out)
    assert metrics["protocol"]["classes"][0] == "neutral" and metrics["protocol"]["split"] == "test"
    assert metrics["protocol"]["num_processes"] == 1
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 could not be loaded" in (out / "report.md").read_text()


def test_eval_exits_nonzero_when_nothing_can_be_scored(saved_model, tmp_path):
    root = make_tone_corpus(tmp_path / "corpus", {"test": 1})
    for wav in (root / "output_repeated_splits_test").glob("*.wav"):
        wav.write_bytes(b"%PDF-1.4 not audio")
    assert cli(["eval", "--model", str(saved_model), "--dataset", "meld", "--root", str(root),
                "--out", str(tmp_path / "eval")]) == 1


# ---------------------------------------------------------------- batch-size invariance


def assert_same_predictions(rows_a: list[dict], rows_b: list[dict], atol: float = 1e-5) -> None:
    """Same keys in the same order, same status/error/pred/answer, per-label scores within atol."""
    assert [r["key"] for r in rows_a] == [r["key"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        assert list(a) == list(b), (a, b)
        assert (a["status"], a["error"], a["gold"], a["pred"], a["answer"]) == \
            (b["status"], b["error"], b["gold"], b["pred"], b["answer"]), a["key"]
        assert (a["scores"] is None) == (b["scores"] is None), a["key"]
        if a["scores"] is not None:
            assert list(a["scores"]) == list(b["scores"]), a["key"]
            np.testing.assert_allclose(list(a["scores"].values()), list(b["scores"].values()), rtol=0, atol=atol,
                                       err_msg=a["key"])


def test_batch_size_1_and_16_score_identically(eval_out):
    one, one_metrics = read_outputs(eval_out("--batch-size", "1"))
    sixteen, sixteen_metrics = read_outputs(eval_out("--batch-size", "16"))
    assert len(one) == 18 and [r["key"] for r in one if r["status"] == "error"] == [BROKEN]
    scored = [r for r in one if r["scores"]]
    assert all(r["pred"] == max(r["scores"], key=r["scores"].get) for r in scored)
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-5 for r in scored)
    spread = np.ptp([list(r["scores"].values()) for r in scored], axis=0).max()
    assert spread > 2e-4, spread  # rows differ by far more than the tolerance: a row mix-up would show
    assert_same_predictions(one, sixteen)
    one_metrics.pop("protocol"), sixteen_metrics.pop("protocol")
    assert one_metrics == sixteen_metrics


def test_batch_size_1_and_16_generate_the_same_answers(eval_out):
    one, _ = read_outputs(eval_out("--mode", "generate", "--batch-size", "1"))
    sixteen, metrics = read_outputs(eval_out("--mode", "generate", "--batch-size", "16"))
    ok = [r for r in one if r["status"] == "ok"]
    assert len(ok) == 17 and all(isinstance(r["answer"], str) and r["scores"] is None for r in ok)
    assert len({r["answer"] for r in ok}) > 1  # answers differ between clips: a row mix-up would show
    assert_same_predictions(one, sixteen)
    assert metrics["protocol"]["mode"] == "generate"
    # whatever the random tiny model says, each prediction is its answer read through the aliases
    assert all(r["pred"] == map_answer(r["answer"], get_label_set("meld7")) for r in ok)
    assert metrics["unmapped_answers"] == sum(r["pred"] == UNMAPPED for r in ok)


# ---------------------------------------------------------------- --mode generate: aliases, unmappable answers


@pytest.mark.parametrize(
    "answer,label_set,expected",
    [
        ("The speaker sounds happy.", "meld7", "joy"),
        ("angry", "meld7", "anger"),
        ("Anger.", "meld7", "anger"),
        ("I think they are scared.", "meld7", "fear"),
        ("Emotion: neutral", "meld7", "neutral"),
        ("I cannot tell", "meld7", UNMAPPED),
        ("happy or sad", "meld7", UNMAPPED),  # ambiguous: counted, not guessed
        ("", "meld7", UNMAPPED),
        (None, "meld7", UNMAPPED),
        ("The speaker sounds joyful.", "iemocap4", "happy"),
        ("joy", "iemocap_patamia4", UNMAPPED),  # not an alias there
    ],
)
def test_map_answer(answer, label_set, expected):
    assert map_answer(answer, get_label_set(label_set)) == expected


FAKE_ANSWERS = {  # per tone class: what a (fake) LLM says, alternating by clip length parity
    "neutral": ("It sounds neutral.", "Calm, I would say."),
    "joy": ("The speaker sounds happy.", "Surprised!"),  # the second is wrong, and names a class not in gold
    "anger": ("angry", "I cannot tell"),  # the second maps to nothing
}


def _fake_answer(clip: np.ndarray) -> str:
    peak = np.argmax(np.abs(np.fft.rfft(clip))) * 16000 / len(clip)
    tone = min(TONES, key=lambda name: abs(TONES[name] - peak))
    return FAKE_ANSWERS[tone][len(clip) % 2]


def test_generate_counts_unmappable_answers_and_keeps_their_rows(saved_model, corpus, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(EmotionRecognizer, "chat_batch",
                        lambda self, audios, questions, texts=None, max_new_tokens=64: [_fake_answer(a) for a in audios])
    out = tmp_path / "eval"
    assert cli(["eval", "--model", str(saved_model), "--dataset", "meld", "--root", str(corpus), "--out", str(out),
                "--mode", "generate", "--batch-size", "4"]) == 0
    rows, metrics = read_outputs(out)
    assert len(rows) == 18 and [r["key"] for r in rows if r["status"] == "error"] == [BROKEN]
    ok = [r for r in rows if r["status"] == "ok"]
    expected = {"It sounds neutral.": "neutral", "Calm, I would say.": "neutral", "The speaker sounds happy.": "joy",
                "Surprised!": "surprise", "angry": "anger", "I cannot tell": UNMAPPED}
    assert all(r["pred"] == expected[r["answer"]] for r in ok), [(r["answer"], r["pred"]) for r in ok]
    unmapped = [r for r in ok if r["pred"] == UNMAPPED]
    assert unmapped and all(r["gold"] == "anger" for r in unmapped)  # kept, with their gold label
    assert {r["pred"] for r in ok} == {"neutral", "joy", "surprise", "anger", UNMAPPED}  # the fake really varied
    assert metrics["unmapped_answers"] == metrics["num_unknown_predictions"] == len(unmapped)
    assert metrics["rows_ok"] == 17  # unmappable answers are scored (as wrong), never dropped
    assert metrics["confusion_matrix_columns"][-1] == UNMAPPED
    assert metrics["per_class"]["anger"]["recall"] == (6 - len(unmapped)) / 6  # dia5 (broken) is a neutral row
    assert_metrics_match_sklearn(out)


def test_score_mode_metrics_match_sklearn(eval_out):
    assert_metrics_match_sklearn(eval_out("--batch-size", "16"))


# ---------------------------------------------------------------- sharded over processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_eval_sharded_over_two_cpu_processes_equals_one_process(audio_model, corpus, eval_out, tmp_path):
    single = eval_out("--batch-size", "16")
    out = tmp_path / "sharded"
    # `accelerate launch --cpu --num_processes 2` would silently start one process; this starts two gloo ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "emoq.cli", "eval", "--model", str(audio_model),
           "--dataset", "meld", "--root", str(corpus), "--split", "test", "--out", str(out), "--batch-size", "16"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    print(f"2-process eval: {time.monotonic() - start:.1f}s")
    assert proc.returncode == 0, f"--- stdout\n{tail(proc.stdout)}\n--- stderr\n{tail(proc.stderr)}"
    assert proc.stdout.count("wrote ") == 1, proc.stdout  # rank 0 alone writes
    rows, metrics = read_outputs(out)
    expected_rows, expected_metrics = read_outputs(single)
    assert len(rows) == 18
    assert_same_predictions(rows, expected_rows)
    assert metrics["protocol"]["num_processes"] == 2 and expected_metrics["protocol"]["num_processes"] == 1
    metrics.pop("protocol"), expected_metrics.pop("protocol")
    assert metrics == expected_metrics
    assert (out / "confusion_matrix.png").is_file() and (out / "report.md").is_file()


def test_eval_on_iemocap_fold_and_on_a_manifest_reports_every_row(tmp_path):
    from support.media import build_iemocap_tree, write_tone

    from emoq.models.tiny import build_tiny

    labels = list(get_label_set("iemocap4").labels)
    model, processor = build_tiny(labels, lora={"r": 4}, seed=1)
    model.save_pretrained(tmp_path / "model" / "weights")
    processor.save_pretrained(tmp_path / "model" / "weights")
    root = build_iemocap_tree(tmp_path / "iemocap", sessions=(1, 5), missing=("Ses05F_impro01_F000",))
    out = tmp_path / "iemo_eval"
    assert cli(["eval", "--model", str(tmp_path / "model"), "--dataset", "iemocap", "--root", str(root),
                "--fold", "5", "--out", str(out)]) == 0
    rows, metrics = read_outputs(out)
    assert len(rows) == 9 and all(r["key"].startswith("Ses05") for r in rows)  # Session 5 only, all kept
    assert [r["key"] for r in rows if r["status"] == "error"] == ["Ses05F_impro01_F000"]
    assert metrics["rows_ok"] == 8 and metrics["protocol"]["dataset"] == "iemocap"
    assert metrics["protocol"]["split"] == "Session5" and metrics["protocol"]["classes"] == labels
    assert {r["gold"] for r in rows} <= set(labels) and "happy" in {r["gold"] for r in rows}  # exc merged

    manifest = tmp_path / "m.jsonl"
    write_tone(tmp_path / "a.wav", 0.5)
    write_tone(tmp_path / "b.flac", 0.7, subtype="PCM_24")
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"key": "a", "audio": "a.wav", "label": "sad"}, {"key": "b", "audio": "b.flac", "label": "angry"},
        {"key": "gone", "audio": "gone.wav", "label": "neutral"}]) + "\n")
    out = tmp_path / "manifest_eval"
    assert cli(["eval", "--model", str(tmp_path / "model"), "--manifest", str(manifest), "--label-set", "iemocap4",
                "--out", str(out)]) == 0
    rows, metrics = read_outputs(out)
    assert [r["key"] for r in rows] == ["a", "b", "gone"] and [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert "gone.wav" in rows[2]["error"] and metrics["rows_ok"] == 2 and metrics["protocol"]["dataset"] == "manifest"


# ---------------------------------------------------------------- --transcripts gold | asr | none


@pytest.mark.parametrize("choice", ["gold", "asr", "none"])
def test_transcripts_choice_is_stamped_and_every_row_says_what_it_read(saved_model, corpus, tmp_path, stub_asr,
                                                                       choice):
    out = tmp_path / "eval"
    options = ["--asr", "stub/whisper"] + ([] if choice == "gold" else ["--transcripts", choice])
    assert cli(["eval", "--model", str(saved_model), "--dataset", "meld", "--root", str(corpus), "--out", str(out),
                "--batch-size", "8", *options]) == 0
    rows, metrics = read_outputs(out)
    assert metrics["protocol"]["transcripts"] == choice
    assert metrics["protocol"]["asr_model"] == ("stub/whisper" if choice == "asr" else None)
    assert f"transcripts: {choice}" in (out / "report.md").read_text()
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(rows) == 18 and len(ok) == 17
    broken, = (r for r in rows if r["status"] == "error")
    assert broken["transcript"] is None and broken["transcript_source"] is None  # nothing was read
    if choice == "gold":  # the corpus's own transcripts; the ASR model is never loaded
        assert {(r["transcript"], r["transcript_source"]) for r in ok} == {("okay then", "gold")}
        assert stub_asr == []
    elif choice == "asr":  # the corpus's transcripts ignored: every clip transcribed, once
        assert all(r["transcript_source"] == "asr" and re.fullmatch(r"heard \d+ samples", r["transcript"])
                   for r in ok)
        (ref, asr), = stub_asr
        assert ref == "stub/whisper" and asr.clips == 17
        lengths = {r["key"]: len(sf.read(corpus / "output_repeated_splits_test" / f"{r['key'][5:]}.wav")[0])
                   for r in ok}
        assert all(r["transcript"] == f"heard {lengths[r['key']]} samples" for r in ok)  # each row its own
    else:
        assert {(r["transcript"], r["transcript_source"]) for r in ok} == {(None, "none")} and stub_asr == []


def test_transcripts_asr_without_an_asr_model_is_a_clear_error(saved_model, corpus, tmp_path):
    with pytest.raises(SystemExit, match="--transcripts asr.*no ASR model.*--asr"):
        cli(["eval", "--model", str(saved_model), "--dataset", "meld", "--root", str(corpus),
             "--out", str(tmp_path / "eval"), "--transcripts", "asr"])  # no run config: no ASR model


def test_a_model_without_transcripts_evaluates_with_none(tmp_path, stub_asr, capsys):
    from support.media import write_tone

    from emoq.models.tiny import build_tiny

    model, processor = build_tiny(["neutral", "joy", "anger"], use_transcript=False)
    model.save_pretrained(tmp_path / "model" / "weights")
    processor.save_pretrained(tmp_path / "model" / "weights")
    write_tone(tmp_path / "a.wav", 0.5)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"key": "a", "audio": "a.wav", "label": "joy", "text": "hello"}) + "\n")
    out = tmp_path / "eval"
    assert cli(["eval", "--model", str(tmp_path / "model"), "--manifest", str(manifest), "--out", str(out),
                "--transcripts", "asr", "--asr", "stub/whisper"]) == 0
    assert "trained without transcripts" in capsys.readouterr().err
    rows, metrics = read_outputs(out)
    assert metrics["protocol"]["transcripts"] == "none" and metrics["protocol"]["asr_model"] is None
    assert (rows[0]["transcript"], rows[0]["transcript_source"]) == (None, "none") and stub_asr == []


def test_head_mode_scores_with_the_emoq_former_classifier(eval_out, audio_model, corpus):
    """`--mode head`: each row's prediction is the argmax of the classification head (what a stage-1 model
    has), recomputed here from the model; the protocol says which scoring ran."""
    import torch

    from emoq.data.meld import read_meld
    from emoq.inference import EmotionRecognizer

    rows, metrics = read_outputs(eval_out("--mode", "head", "--batch-size", "3"))
    assert metrics["protocol"]["mode"] == "head"
    assert_metrics_match_sklearn(eval_out("--mode", "head", "--batch-size", "3"))
    recognizer = EmotionRecognizer.from_pretrained(audio_model)
    by_key = {u.key: u for u in read_meld(corpus, "test")}
    for row in (r for r in rows if r["status"] == "ok"):
        clip = recognizer.load(by_key[row["key"]].audio)
        batch = recognizer._inputs(recognizer.processor([clip], transcripts=[row["transcript"]]))
        with torch.no_grad():
            logits = recognizer.model(input_features=batch["input_features"],
                                      feature_attention_mask=batch["feature_attention_mask"]).emotion_logits
        assert row["pred"] == recognizer.labels[int(logits.argmax())]
