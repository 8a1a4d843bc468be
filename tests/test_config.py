"""Typed configuration: sections registered by methods, Literal choices, range checks at load time,
`base:` merging, keys a method ignores, float spellings, method discovery."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from itmatch.cli import main
from itmatch.config import (
    PACKAGED_CONFIGS,
    Config,
    ModelConfig,
    config_from_dict,
    load_config,
    packaged_config_names,
    registered_sections,
)
from itmatch.errors import ItmatchError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- keys and types ---------------------------------------------------------------------------

def test_unknown_keys_name_the_full_dotted_key():
    with pytest.raises(ItmatchError, match=r"unknown config key 'model\.image\.kindd'"):
        load_config(None, ["model.image.kindd=grid"])
    with pytest.raises(ItmatchError, match=r"unknown config key 'optimizer'.*known under '\.'.*hrem"):
        config_from_dict({"optimizer": {"lr": 0.1}})


@pytest.mark.parametrize("key, value, allowed", [
    ("model.image.kind", "regions", "precomp, grid"),
    ("model.text.kind", "lstm", "gru, bert"),
    ("model.pooling", "attention", "gpo, mean, max"),
    ("loss.name", "contrastive", "hinge, triplet, infonce"),
    ("sampler.kind", "cluster", "random, neighbour"),
    ("data.format", "parquet", "precomp, karpathy, csv, jsonl"),
    ("optim.schedule", "linear", "step, cosine, constant"),
])
def test_choices_outside_their_literal_list_the_allowed_values(key, value, allowed):
    with pytest.raises(ItmatchError, match=f"config key '{key}': '{value}' is not one of {allowed}"):
        load_config(None, [f"{key}={value}"])


def test_section_choices_are_literals_too():
    with pytest.raises(ItmatchError, match="'hrem.mechanism': 'both' is not one of fusion, standalone"):
        load_config(None, ["model.method=hrem", "hrem.mechanism=both"])
    with pytest.raises(ItmatchError, match="'hrem.matching': 'dot' is not one of scan, cosine"):
        load_config(None, ["model.method=hrem", "hrem.matching=dot"])
    for key, value in (("distance", "l1"), ("sparsity", "dense"), ("dim_samples", "words")):
        with pytest.raises(ItmatchError, match=f"'dias.{key}': '{value}' is not one of"):
            load_config(None, ["model.method=dias", f"dias.{key}={value}"])


def test_literal_choices_match_what_the_code_dispatches_on():
    from itmatch.encoders.pooling import POOLINGS
    from itmatch.objectives.base import LOSSES
    from itmatch.similarity.fragment import SCORES
    from itmatch.training.optim import SCHEDULES

    def choices(cls, name):
        return typing.get_args(typing.get_type_hints(cls)[name])

    from itmatch.config import LossConfig, OptimConfig
    from itmatch.methods.hrem import HremConfig

    assert choices(ModelConfig, "pooling") == tuple(POOLINGS)
    assert choices(LossConfig, "name") == tuple(LOSSES)
    assert choices(OptimConfig, "schedule") == tuple(SCHEDULES)
    assert set(choices(HremConfig, "matching")) == set(SCORES)


@pytest.mark.parametrize("override, key", [
    ("model.embed_dim=0", "model.embed_dim"), ("model.gpo_pe_dim=0", "model.gpo_pe_dim"),
    ("model.text.word_dim=0", "model.text.word_dim"), ("model.image.region_drop=1.0", "model.image.region_drop"),
    ("optim.lr=-1e-3", "optim.lr"), ("train.batch_size=0", "train.batch_size"),
    ("sampler.clusters_per_batch=0", "sampler.clusters_per_batch"), ("data.root=scenes:huge", "data.root"),
    ("loss.temperature=0", "loss.temperature"), ("loss.regularizers=[dias, dias]", "loss.regularizers"),
])
def test_range_checks_run_when_the_config_loads(override, key):
    with pytest.raises(ItmatchError, match=f"config key '{key}'"):
        load_config(None, [override])


def test_hrem_heads_must_divide_the_embedding_size():
    with pytest.raises(ItmatchError, match=r"hrem.heads.*divisor of model.embed_dim \(256\)"):
        load_config("hrem_scenes", ["hrem.heads=3"])
    load_config("hrem_scenes", ["hrem.heads=8"])


def test_dias_method_refuses_the_dias_regularizer_at_load_time():
    with pytest.raises(ItmatchError, match="method dias already includes the dias regularizer"):
        load_config("dias_scenes", ["loss.regularizers=[dias]"])


def test_bad_train_value_is_one_line_exit_2_and_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    # data.root names a folder that does not exist: the config error comes first, nothing is read
    code = main(["train", "--config", "vse_scenes", "--set", "optim.schedule=linear", "--set",
                 f"data.root={tmp_path / 'missing'}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("itmatch: error: config key 'optim.schedule'")
    assert not out.exists()
    code = main(["train", "--config", "hrem_scenes", "--set", "hrem.tau=0", "--out", str(out)])
    assert code == 2 and "hrem.tau" in capsys.readouterr().err and not out.exists()


# ---- floats ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling, value", [("1e-3", 1e-3), ("1E-3", 1e-3), ("5e+2", 500.0), ("0.001", 1e-3),
                                             ("3", 3.0), ("1_000.5", 1000.5), (".5", 0.5), ("-2e-1", -0.2)])
def test_every_float_spelling_works_in_set_and_in_yaml(tmp_path, spelling, value):
    assert load_config(None, [f"loss.triplet_cutoff={spelling}"]).loss.triplet_cutoff == value
    path = write(tmp_path / "c.yaml", f"loss:\n  triplet_cutoff: {spelling}\n")
    assert yaml.safe_load(path.read_text())["loss"]["triplet_cutoff"] is not None
    cfg = load_config(path)
    assert cfg.loss.triplet_cutoff == value and isinstance(cfg.loss.triplet_cutoff, float)


def test_set_optim_lr_1e_3():
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_ints_and_bools_stay_strict():
    for override in ("train.batch_size=1e2", "train.batch_size=2.0", "train.batch_size='64'", "train.amp=1",
                     "optim.lr=fast", "optim.lr=true"):
        with pytest.raises(ItmatchError, match="expected"):
            load_config(None, [override])


# ---- sections ----------------------------------------------------------------------------------

def test_sections_exist_only_for_what_the_config_uses():
    vse = load_config("vse_scenes")
    assert set(vse.to_dict()) == {"model", "loss", "data", "optim", "train", "sampler"}
    with pytest.raises(AttributeError, match="no section 'hrem'"):
        vse.hrem  # noqa: B018
    hrem = load_config("hrem_dias_scenes")
    assert list(hrem.to_dict())[-2:] == ["hrem", "dias"] and hrem.hrem.heads == 4 and hrem.dias.w_dim == 100.0
    assert load_config(None, ["model.method=hrem"]).hrem.heads == 16  # defaults where the file has none


def test_a_section_of_an_unused_method_is_an_error_naming_it():
    with pytest.raises(ItmatchError, match=r"config key 'hrem': the config does not use hrem"):
        load_config("vse_scenes", ["hrem.tau=0.3"])
    with pytest.raises(ItmatchError, match=r"config key 'dias': the config does not use dias"):
        config_from_dict({"dias": {"w_dim": 1.0}})


def test_a_key_the_method_ignores_is_an_error(tmp_path):
    path = write(tmp_path / "h.yaml", "base: hrem_scenes\nmodel:\n  pooling: gpo  # unused by hrem\n")
    with pytest.raises(ItmatchError, match=r"config key 'model.pooling': method hrem does not use it"):
        load_config(path)
    with pytest.raises(ItmatchError, match="model.gpo_hidden"):
        load_config("hrem_scenes", ["model.gpo_hidden=16"])
    # a key set in a base counts too: the merged file sets it explicitly
    base = write(tmp_path / "v.yaml", "model:\n  pooling: mean\n")
    child = write(tmp_path / "c.yaml", "base: v.yaml\nmodel:\n  method: hrem\n")
    with pytest.raises(ItmatchError, match="model.pooling"):
        load_config(child)
    assert load_config(base).model.pooling == "mean"


def test_round_trip_through_to_dict_and_yaml():
    for name in packaged_config_names():
        cfg = load_config(name)
        again = config_from_dict(cfg.to_dict())
        assert again == cfg and again.to_dict() == cfg.to_dict()
        assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_a_runs_config_yaml_loads_again(tmp_path):
    """RUN/config.yaml (Config.to_yaml) leaves out the keys the method ignores, so load_config takes it."""
    for name in ("hrem_dias_scenes", "vse_scenes", "dias_scenes"):
        cfg = load_config(name)
        path = write(tmp_path / f"{name}.yaml", cfg.to_yaml())
        assert load_config(path) == cfg
    assert "pooling" not in yaml.safe_load(load_config("hrem_scenes").to_yaml())["model"]


def test_checkpoint_configs_of_0_1_0_with_every_section_still_load():
    """itmatch 0.1.0 saved every section, used or not; unused ones holding defaults are dropped there."""
    from itmatch.methods.hrem import HremConfig
    from itmatch.objectives.dias import DiasConfig

    saved = load_config("vse_scenes").to_dict()
    saved.update(hrem=dataclasses.asdict(HremConfig()), dias=dataclasses.asdict(DiasConfig()))
    assert config_from_dict(saved, saved=True) == load_config("vse_scenes")
    with pytest.raises(ItmatchError, match="config key 'hrem'"):
        config_from_dict(saved)
    saved["hrem"]["tau"] = 0.3
    with pytest.raises(ItmatchError, match="config key 'hrem'"):
        config_from_dict(saved, saved=True)


def test_a_new_method_registers_its_own_section():
    from itmatch.methods import registry
    from itmatch.methods.vse import VSE

    @dataclass
    class ToyConfig:
        scale: float = 1.0
        mode: Literal["a", "b"] = "a"

        def check(self, cfg):
            if self.scale <= 0:
                raise ItmatchError(f"config key 'toy.scale': {self.scale} must be > 0")

    @registry.register_method("toy", config=ToyConfig, ignores=("model.gpo_hidden",))
    class Toy(VSE):
        pass

    try:
        assert "toy" in registry.available_methods() and "toy" in registered_sections()
        cfg = load_config(None, ["model.method=toy", "toy.scale=2e-1", "toy.mode=b"])
        assert cfg.toy == ToyConfig(scale=0.2, mode="b")
        data = cfg.to_dict()
        assert data["toy"] == {"scale": 0.2, "mode": "b"} and "hrem" not in data
        assert config_from_dict(data) == cfg
        assert load_config(None, ["model.method=toy"]).toy == ToyConfig()
        with pytest.raises(ItmatchError, match="toy.scale"):
            load_config(None, ["model.method=toy", "toy.scale=0"])
        with pytest.raises(ItmatchError, match="'toy.mode': 'c' is not one of a, b"):
            load_config(None, ["model.method=toy", "toy.mode=c"])
        with pytest.raises(ItmatchError, match="model.gpo_hidden"):
            load_config(None, ["model.method=toy", "model.gpo_hidden=8"])
        with pytest.raises(ItmatchError, match="config key 'toy'"):
            load_config(None, ["toy.scale=2"])
    finally:
        from itmatch.sections import SECTIONS

        registry.unregister_method("toy")
        SECTIONS.pop("toy", None)


def test_a_section_name_cannot_be_taken_twice_or_shadow_a_core_section():
    from itmatch.config import register_section
    from itmatch.methods.hrem import HremConfig

    @dataclass
    class Other:
        x: int = 0

    with pytest.raises(ValueError, match="core section"):
        register_section("model", Other)
    with pytest.raises(ValueError, match="registered twice"):
        register_section("hrem", Other)
    register_section("hrem", HremConfig)  # the same class again is fine (module reloads)


# ---- base: -------------------------------------------------------------------------------------

def test_base_is_deep_merged_relative_to_the_file(tmp_path):
    write(tmp_path / "sub" / "a.yaml", "model:\n  embed_dim: 64\n  text:\n    word_dim: 32\noptim:\n"
                                       "  decay_epochs: [1, 2]\n  lr: 0.1\n")
    b = write(tmp_path / "b.yaml", "base: sub/a.yaml\nmodel:\n  text:\n    num_layers: 2\noptim:\n"
                                   "  decay_epochs: [5]\n")
    c = write(tmp_path / "other" / "c.yaml", "base: ../b.yaml\noptim:\n  lr: 1e-2\n")
    cfg = load_config(c, ["model.text.word_dim=16"])
    assert (cfg.model.embed_dim, cfg.model.text.word_dim, cfg.model.text.num_layers) == (64, 16, 2)
    assert cfg.optim.decay_epochs == [5] and cfg.optim.lr == 0.01  # lists are replaced, not merged
    assert load_config(b).optim.lr == 0.1


def test_base_may_name_a_packaged_config(tmp_path):
    path = write(tmp_path / "mine.yaml", "base: hrem_scenes\nhrem:\n  tau: 0.3\n")
    cfg = load_config(path)
    expected = load_config("hrem_scenes", ["hrem.tau=0.3"])
    assert cfg == expected and cfg.hrem.heads == 4


def test_base_cycles_and_missing_bases_are_errors(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: c.yaml\n")
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ItmatchError, match="config key 'base'.*cycle.*a.yaml -> .*b.yaml -> .*c.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ItmatchError, match="cycle"):
        load_config(tmp_path / "self.yaml")
    write(tmp_path / "m.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ItmatchError, match="config key 'base' in .*m.yaml: nowhere.yaml is neither"):
        load_config(tmp_path / "m.yaml")


def test_packaged_configs_build_on_bases():
    texts = {name: (PACKAGED_CONFIGS / f"{name}.yaml").read_text() for name in packaged_config_names()}
    assert sum("base:" in t for t in texts.values()) >= 12
    assert "base: hrem_f30k_precomp_bigru.yaml" in texts["hrem_f30k_precomp_bert"]
    for name in packaged_config_names():
        assert isinstance(load_config(name), Config)


# ---- discovery ---------------------------------------------------------------------------------

def test_discovery_finds_every_method_module():
    from itmatch.methods.registry import _METHODS, available_methods, available_regularizers

    assert {"vse", "hrem", "dias"} <= set(available_methods())
    assert "dias" in available_regularizers()
    assert _METHODS["hrem"].ignores == ("model.pooling", "model.gpo_pe_dim", "model.gpo_hidden")


def test_an_import_error_inside_a_method_module_is_raised(monkeypatch, tmp_path):
    import itmatch.methods as package
    from itmatch.methods import registry

    write(tmp_path / "broken_method.py", "import a_module_that_does_not_exist\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_discovered", False)
    with pytest.raises(ModuleNotFoundError, match="a_module_that_does_not_exist"):
        registry.discover_methods()
