"""Config system: YAML + overrides + strict validation; every shipped YAML validates."""

from pathlib import Path

import pytest

from emoq.config import ConfigError, RunConfig, load_config, save_config
from emoq.recipes import CONFIGS_DIR

SHIPPED = sorted(p for p in CONFIGS_DIR.rglob("*.yaml") if "accelerate" not in p.parts)


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS_DIR)))
def test_every_shipped_config_validates_and_names_its_launch_command(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    header = path.read_text().splitlines()[:8]
    assert any("emoq run" in line or "accelerate launch" in line for line in header if line.startswith("#")), path


def test_misspelled_key_names_key_file_and_closest_match(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  num_query_tokns: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert str(f) in msg and "model.num_query_tokns" in msg and "did you mean 'model.num_query_tokens'" in msg


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("trainer:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'trainer.batch_size' expects int, got 'eight'"):
        load_config(f)


def test_no_and_yes_are_strings_true_and_false_are_booleans(tmp_path):
    """YAML 1.2 booleans: accelerate's `mixed_precision: no` is the string 'no', in a file and on the command line."""
    f = tmp_path / "precision.yaml"
    f.write_text("trainer:\n  mixed_precision: no\n  resume: false\n")
    assert load_config(f).trainer.mixed_precision == "no" and load_config(f).trainer.resume is False
    cfg = load_config(f, ["trainer.mixed_precision=no", "trainer.resume=true"])
    assert cfg.trainer.mixed_precision == "no" and cfg.trainer.resume is True
    with pytest.raises(ConfigError, match="'trainer.resume' expects bool"):
        load_config(f, ["trainer.resume=yes"])


def test_overrides_are_typed_and_interpolated(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text("run_name: exp\nmodel:\n  lora:\n    r: 4\n")
    cfg = load_config(f, ["trainer.output_dir=out/${run_name}", "stage1.learning_rate=1e-3", "model.encoder_layers=[2,3]"])
    assert cfg.trainer.output_dir == "out/exp"
    assert cfg.stage1.output_dir == "out/exp/stage1"
    assert cfg.stage2.init_from == "out/exp/stage1/best"  # the dev-selected stage-1 checkpoint
    assert cfg.stage1.learning_rate == pytest.approx(1e-3)
    assert cfg.model.encoder_layers == [2, 3] and cfg.model.lora.r == 4
    with pytest.raises(ConfigError, match="command line: 'trainer.max_steps' expects int"):
        load_config(f, ["trainer.max_steps=two"])
    with pytest.raises(ConfigError, match="did you mean 'trainer.max_steps'"):
        load_config(f, ["trainer.max_step=2"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(f, ["model.quantization=3bit"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["run_name=x", "model.window_seconds=2.5"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_run_collects_overrides_placed_before_and_after_options(monkeypatch):
    import emoq.cli.run

    seen = []
    monkeypatch.setattr(emoq.cli.run, "cmd_run", lambda args: seen.append(args) or 0)
    emoq.cli.main(["run", "stage2_llm", "--config", "emoq/tiny_test", "a.b=1", "--nproc", "2", "c.d=2"])
    assert seen[0].overrides == ["a.b=1", "c.d=2"] and seen[0].nproc == 2


def test_run_rejects_unknown_options_and_other_commands_reject_strays(capsys):
    import emoq.cli

    with pytest.raises(SystemExit):
        emoq.cli.main(["run", "stage2_llm", "--config", "emoq/tiny_test", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        emoq.cli.main(["validate", "--nope=1"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_deepspeed_launch_resolves_its_json_and_does_not_force_cpu():
    from emoq.cli.run import launch_command
    from emoq.recipes import find_shipped

    cmd = launch_command(find_shipped("stage2_llm"), Path("c.yaml"), [], 2, "zero2")
    ds = cmd[cmd.index("--deepspeed_config_file") + 1]
    assert Path(ds).is_absolute() and Path(ds) == find_shipped("deepspeed/zero2").resolve()
    ddp = launch_command(find_shipped("stage2_llm"), Path("c.yaml"), [], 2, None)
    assert "--deepspeed_config_file" not in ddp
