import pytest

from distill.config import apply_override, build_config, dump_config, load_config
from distill.errors import ConfigError


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "student: {config: {model_type: llama}, tokenizer: builtin}\nobjective: {alpha: 0}\n"


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.steps=300", "objective.alpha=0.0", "train.max_grad_norm=null"])
    assert cfg.train.steps == 300 and cfg.train.max_grad_norm is None


def test_unknown_key_names_path_and_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.stpes' \(did you mean 'train.steps'\?\)"):
        load_config(write(tmp_path, BASE), ["train.stpes=3"])


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'traing' \(did you mean 'train'\?\)"):
        load_config(write(tmp_path, BASE + "traing: {steps: 1}\n"))


def test_wrong_type_says_expected_and_got(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.steps': expected a valid integer.*got 'many'"):
        load_config(write(tmp_path, BASE), ["train.steps=many"])


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match=r"'objective.alpha': expected less than or equal to 1, got 1.5"):
        load_config(write(tmp_path, BASE), ["objective.alpha=1.5"])


def test_kd_without_teacher_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="neither 'teacher' nor 'teacher_cache' is set"):
        load_config(write(tmp_path, BASE), ["objective.alpha=0.5"])


def test_model_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="'student': give exactly one of"):
        load_config(write(tmp_path, "student: {name: a, config: {model_type: llama}}\n"))


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "student:\n  name: [unclosed\ntrain: {steps: 1}\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: malformed YAML"):
        load_config(bad)


def test_override_syntax_errors(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(write(tmp_path, BASE), ["train.steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"train": 3}, "train.steps=1")


def test_dump_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.steps=7"])
    again = load_config(write(tmp_path, dump_config(cfg), "again.yaml"))
    assert again == cfg


def test_every_field_is_documented():
    from distill.config import RunConfig

    def walk(model):
        for name, field in model.model_fields.items():
            yield model.__name__, name, field
            ann = field.annotation
            for cand in getattr(ann, "__args__", (ann,)):
                if isinstance(cand, type) and hasattr(cand, "model_fields"):
                    yield from walk(cand)

    missing = [f"{m}.{n}" for m, n, f in walk(RunConfig) if not f.description and n not in ("data", "objective", "train", "eval")]
    assert missing == []
    assert build_config({"student": {"name": "x"}, "objective": {"alpha": 0}}).student.name == "x"
