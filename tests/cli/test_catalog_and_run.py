"""The `emoq` command: help for every subcommand, ls / cp / validate on what ships, clear errors."""

import pytest

from emoq.cli import build_parser, main
from emoq.recipes import CONFIGS_DIR, RECIPES_DIR

SUBCOMMANDS = ["ls", "cp", "validate", "run", "prepare", "eval", "chat", "predict", "export", "serve", "demo"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS) and "emoq run stage1_qformer" in out  # with examples


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_useful_help(capsys, name):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: emoq {name}") and "unavailable" not in out
    subparser = build_parser()._subparsers._group_actions[0].choices[name]
    assert subparser.description or subparser.format_help().count("\n") > 4  # says more than its usage line


def test_ls_names_recipes_configs_and_builtin_models(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in ("stage1_qformer", "stage2_llm", "train_baseline", "emoq/demo_cpu", "qieemo/demo_cpu",
                 "patamia/iemocap_wav2vec2-large_bert-base", "accelerate/zero2", "deepspeed/zero3",
                 "builtin:whisper-tiny.en", "builtin:smollm2-135m-instruct", "builtin:all-minilm-l6-v2"):
        assert name in out, name


def test_cp_copies_a_recipe_and_a_config_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["cp", "train_baseline", str(tmp_path)]) == 0
    assert (tmp_path / "train_baseline.py").read_text() == (RECIPES_DIR / "train_baseline.py").read_text()
    assert main(["cp", "emoq/demo_cpu", str(tmp_path / "my.yaml")]) == 0
    assert (tmp_path / "my.yaml").read_text() == (CONFIGS_DIR / "emoq/demo_cpu.yaml").read_text()
    with pytest.raises(SystemExit, match="exists"):
        main(["cp", "emoq/demo_cpu", str(tmp_path / "my.yaml")])
    with pytest.raises(SystemExit, match=r"no recipe or config named 'stage3'.*stage2_llm"):
        main(["cp", "stage3", str(tmp_path)])


def test_validate_every_shipped_config_and_name_the_bad_key(tmp_path, capsys):
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    shipped = [p for p in CONFIGS_DIR.rglob("*.yaml") if "accelerate" not in p.parts]
    assert out.count("ok     ") == len(shipped) >= 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_query_tokns: 8\n")
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}: unknown key 'model.num_query_tokns'; did you mean 'model.num_query_tokens'?" in out
