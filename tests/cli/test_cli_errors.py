"""Bad arguments and inputs end a command with one line naming the problem and a non-zero status, never a
traceback."""

import subprocess
import sys

import pytest

from emoq.cli import main as cli


def _run(args, capsys) -> tuple[int, str]:
    try:
        code = cli(args)
    except SystemExit as done:  # argparse and explicit exits
        code = done.code if isinstance(done.code, int) else 1
        if not isinstance(done.code, int) and done.code is not None:
            print(done.code, file=sys.stderr)
    err = capsys.readouterr().err
    return code, err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "empty").mkdir()
    (root / "foreign").mkdir()
    (root / "foreign" / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    return root


CASES = {
    "eval batch size 0": (["eval", "--model", "{model}", "--dataset", "meld", "--root", "{root}/empty", "--out", "{root}/o",
                           "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    "eval batch size -1": (["eval", "--model", "{model}", "--dataset", "meld", "--root", "{root}/empty", "--out", "{root}/o",
                            "--batch-size", "-1"], "--batch-size: must be at least 1, got -1"),
    "eval without root": (["eval", "--model", "{model}", "--dataset", "meld", "--out", "{root}/o"],
                          "--dataset meld needs --root"),
    "eval root without csv": (["eval", "--model", "{model}", "--dataset", "meld", "--root", "{root}/empty", "--out",
                               "{root}/o"], "test_sent_emo.csv: MELD annotation CSV not found"),
    "eval missing root": (["eval", "--model", "{model}", "--dataset", "meld", "--root", "{root}/nowhere", "--out",
                           "{root}/o"], "MELD annotation CSV not found"),
    "eval hf without path": (["eval", "--model", "{model}", "--dataset", "hf", "--out", "{root}/o"],
                             "--dataset hf needs --path"),
    "eval missing model": (["eval", "--model", "/nonexistent", "--dataset", "meld", "--root", "{root}/empty", "--out",
                            "{root}/o"], "/nonexistent: no EmoQ model here"),
    "predict missing model": (["predict", "--model", "/nonexistent", "{root}/x.wav", "--out", "{root}/p.jsonl"],
                              "/nonexistent: no EmoQ model here"),
    "chat missing model": (["chat", "--model", "/nonexistent", "--audio", "{root}/x.wav", "hello"],
                           "/nonexistent: no EmoQ model here"),
    "predict foreign model": (["predict", "--model", "{root}/foreign", "{root}/x.wav", "--out", "{root}/p.jsonl"],
                              "foreign/config.json: describes a 'bert' model, not an emoq model"),
    "eval broken config": (["eval", "--model", "{root}/broken", "--dataset", "meld", "--root", "{root}/empty",
                            "--out", "{root}/o"], "broken/config.json: not valid JSON"),
    "chat foreign model": (["chat", "--model", "{root}/foreign", "--audio", "{root}/x.wav", "hello"],
                           "describes a 'bert' model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_a_non_zero_status(case, folders, saved_model, capsys):
    args, expected = CASES[case]
    code, err = _run([a.format(model=saved_model, root=folders) for a in args], capsys)
    assert code != 0
    assert expected in err
    assert "Traceback" not in err


def test_a_real_process_shows_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "emoq.cli", "eval", "--model", "/nonexistent", "--dataset", "meld",
                           "--root", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "emoq eval: error: /nonexistent: no EmoQ model here (expected config.json or weights/config.json)"]
