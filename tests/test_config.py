import pytest

from posttrain.config import SFTConfig
from posttrain.config_io import config_hash, load_config
from posttrain.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "model: m\noutput_dir: out\ndatasets:\n  - path: a.jsonl\n    count: 10\n"


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(SFTConfig, write(tmp_path, BASE + "learning_rate: 1.0e-4\n"),
                      ["max_steps=200", "learning_rate=2e-5", "packing=true", "datasets.0.count=5",
                       "report_to=tensorboard"])
    assert cfg.max_steps == 200
    assert cfg.learning_rate == pytest.approx(2e-5)  # YAML reads "2e-5" as a string; it is coerced
    assert cfg.packing is True
    assert cfg.datasets[0].count == 5 and cfg.datasets[0].path == "a.jsonl"
    assert cfg.report_to == ["tensorboard"]
    assert cfg.per_device_train_batch_size == 8  # default


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(UserError, match="unknown key 'learning_rat'; did you mean 'learning_rate'"):
        load_config(SFTConfig, write(tmp_path, BASE), ["learning_rat=1"])
    with pytest.raises(UserError, match=r"config.datasets\[0\]: unknown key 'cuont'; did you mean 'count'"):
        load_config(SFTConfig, write(tmp_path, BASE.replace("count", "cuont")))


@pytest.mark.parametrize("override, message", [
    ("max_steps=ten", "config.max_steps: expected an integer"),
    ("packing=3", "config.packing: expected true or false"),
    ("lr_scheduler_type=cosin", "config.lr_scheduler_type: expected one of linear, cosine, cosine_min, constant"),
    ("loss_reduction=avg", "expected one of mean, sum"),
    ("warmup_ratio=2", "warmup_ratio' must be in"),
    ("datasets.3.count=1", "not an index of a list of 1"),
    ("novalue", "expected key=value"),
])
def test_bad_values(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        load_config(SFTConfig, write(tmp_path, BASE), [override])


def test_required_keys_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="'output_dir' is required"):
        load_config(SFTConfig, write(tmp_path, "model: m\ndatasets: [{path: a}]\n"))
    with pytest.raises(UserError, match="'datasets' is required"):
        load_config(SFTConfig, write(tmp_path, "model: m\noutput_dir: o\n"))
    with pytest.raises(UserError, match=r"c.yaml:2: not valid YAML"):
        load_config(SFTConfig, write(tmp_path, "model: m\n  bad: [\n"))
    with pytest.raises(UserError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "missing.yaml")


def test_hash_ignores_logging_keys(tmp_path):
    a = load_config(SFTConfig, write(tmp_path, BASE))
    b = load_config(SFTConfig, write(tmp_path, BASE), ["logging_steps=7", "save_steps=3"])
    c = load_config(SFTConfig, write(tmp_path, BASE), ["learning_rate=1e-3"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
