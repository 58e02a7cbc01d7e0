from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miles_stream.config import apply_overrides, build
from miles_stream.errors import ConfigError
from miles_stream.run_config import RunConfig, load_run_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_defaults_build_without_any_input() -> None:
    config = build(RunConfig, {})
    assert config.bus.namespace == "miles"
    assert config.algo.eps_clip == 0.2


def test_unknown_key_names_the_dotted_key_and_suggests_the_near_one() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown config key 'bus\.max_backlog_entrie'.*did you mean 'max_backlog_entries'"
    ):
        build(RunConfig, {"bus": {"max_backlog_entrie": 5}})


def test_unknown_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'trainr'"):
        build(RunConfig, {"trainr": {}})


def test_bad_literal_lists_the_allowed_values() -> None:
    with pytest.raises(
        ConfigError, match=r"algo\.kl_loss_type = 'k4' is not allowed \(allowed: 'k1', 'k2', 'k3', 'low_var_kl'\)"
    ):
        build(RunConfig, {"algo": {"kl_loss_type": "k4"}})


def test_wrong_type_names_key_and_type() -> None:
    with pytest.raises(ConfigError, match=r"bus\.block_ms must be int, got 'fast'"):
        build(RunConfig, {"bus": {"block_ms": "fast"}})
    with pytest.raises(ConfigError, match=r"algo\.use_opsm must be bool"):
        build(RunConfig, {"algo": {"use_opsm": 1}})


def test_post_init_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"algo\.eps_clip_c: dual clip needs c > 1"):
        build(RunConfig, {"algo": {"eps_clip_c": 0.5}})


def test_dotted_overrides_parse_yaml_values_and_beat_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("bus:\n  block_ms: 100\nalgo:\n  eps_clip: 0.1\n")
    config = load_run_config(path, ["bus.block_ms=250", "algo.kl_loss_coef=1e-3", "algo.eps_clip_high=null"])
    assert config.bus.block_ms == 250
    assert config.algo.kl_loss_coef == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string; still a float
    assert config.algo.eps_clip == pytest.approx(0.1)
    assert config.algo.eps_clip_high is None


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", ".a=1"])
def test_malformed_override_is_an_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        apply_overrides({}, [bad])


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"bus": 3}, ["bus.block_ms=1"])


def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_run_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    load_run_config(path)


def test_configs_directory_is_not_empty() -> None:
    assert CONFIGS


# ---- fuzzing: whatever a user writes, the loader answers with a config or a ConfigError naming the problem ----
_KEYS = ["bus", "rollout", "trainer", "buffer", "algo", "codec", "feeder", "redis", "nope", "bus.block_ms",
         "rollout.sampling.top_p", "trainer.lr", "buffer.filters", "algo.eps_clip", "trainer.dtype",
         "x.y.z", "block_ms", "lr", "sampling", "top_p", "temperature", "max_new_tokens", "eps_clip", "dtype",
         "filters", "max_staleness", "namespace", "url", "path"]  # real field names inside sections too  # fmt: skip
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), _values, max_size=4))
def test_fuzzed_config_mappings_build_or_raise_config_error(data: dict[str, object]) -> None:
    try:
        build(RunConfig, data)
    except ConfigError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(overrides=st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_KEYS),
                                                           st.text(max_size=10)), max_size=4))  # fmt: skip
def test_fuzzed_overrides_build_or_raise_config_error(overrides: list[str]) -> None:
    try:
        build(RunConfig, apply_overrides({}, overrides))
    except ConfigError as exc:
        assert str(exc)
