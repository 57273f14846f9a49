import subprocess

import pytest

from ovpipe.config import load_config
from ovpipe.core.config import ConfigError, config_hash, section_dump, to_toml
from tests.conftest import python_exe, subprocess_env


def test_defaults_validate():
    cfg = load_config()
    assert cfg.run.seed == 0 and cfg.ingest.max_pixels > 0


def test_unknown_key_in_file_names_key_and_allowed(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[ingest]\nmax_pixel = 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "ingest.max_pixel" in msg and "max_pixels" in msg and str(path) in msg


def test_unknown_section_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[ingset]\nsource = 'x'\n")
    with pytest.raises(ConfigError, match="unknown key 'ingset'.*ingest"):
        load_config(path)


def test_bad_value_names_key_and_constraint():
    with pytest.raises(ConfigError, match=r"ingest\.max_pixels: Input should be greater than 0 \(got -3\)"):
        load_config(overrides=["ingest.max_pixels=-3"])
    with pytest.raises(ConfigError, match=r"run\.seed"):
        load_config(overrides=["run.seed='abc'"])


def test_set_parses_toml_literals_and_plain_strings():
    cfg = load_config(overrides=["run.seed=7", "ingest.source=coyo", 'ingest.image_columns=["a", "b"]'])
    assert cfg.run.seed == 7 and cfg.ingest.source == "coyo" and cfg.ingest.image_columns == ["a", "b"]


@pytest.mark.parametrize("bad", ["run.seed", "seed=3", "run.seed.x=3"])
def test_malformed_set_is_explained(bad):
    with pytest.raises(ConfigError):
        load_config(overrides=[bad])


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\nseed=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_shown_config_round_trips(tmp_path):
    cfg = load_config(overrides=["run.seed=5", "ingest.source=中文源"])
    path = tmp_path / "shown.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    assert load_config(path) == cfg


def test_hash_ignores_fields_that_do_not_change_output():
    a = section_dump(load_config(), ("ingest",))
    b = section_dump(load_config(overrides=["ingest.batch_rows=7"]), ("ingest",))
    c = section_dump(load_config(overrides=["ingest.max_pixels=7"]), ("ingest",))
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_cli_config_show_and_error_exit_code(tmp_path):
    ok = subprocess.run([python_exe(), "-m", "ovpipe.cli", "config", "show", "--set", "run.seed=9"],
                        capture_output=True, text=True, env=subprocess_env())
    assert ok.returncode == 0 and "seed = 9" in ok.stdout
    bad = subprocess.run([python_exe(), "-m", "ovpipe.cli", "config", "show", "--set", "run.sed=9"],
                         capture_output=True, text=True, env=subprocess_env())
    assert bad.returncode == 2 and "unknown key 'run.sed'" in bad.stderr and "Traceback" not in bad.stderr


def test_run_id_hash_keeps_global_pass_fields_that_stage_hashes_leave_out():
    """caption's dedup settings are hashed by its global pass, not per shard; they still change
    the output, so a pipeline run id (hashed_config) must change with them."""
    from ovpipe.pipeline import hashed_config

    base, changed = load_config(), load_config(overrides=["caption.near_dup_threshold=0.5"])
    assert section_dump(base, ("caption",)) == section_dump(changed, ("caption",))
    assert config_hash(hashed_config(base)) != config_hash(hashed_config(changed))
    workers = load_config(overrides=["run.workers=7"])
    assert config_hash(hashed_config(base)) == config_hash(hashed_config(workers))


def test_object_store_output_without_train_run_dir_fails_before_any_step(tmp_path):
    from ovpipe.pipeline import run_pipeline

    (tmp_path / "raw").mkdir()
    with pytest.raises(ValueError, match=r"set train\.run_dir"):
        run_pipeline(str(tmp_path / "raw"), "s3://bucket/curated?region=us-east-1&scheme=http"
                     "&endpoint_override=127.0.0.1:9", load_config(overrides=["balance.fraction=0.5"]),
                     run_id="r")  # nothing listens: no step may run
