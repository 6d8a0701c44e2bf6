"""coe.config.RouterConfig: field validation, directly and through from_dict (which names the field)."""
import pytest

from coe.config import RouterConfig, from_dict
from coe.errors import ConfigError

EXPERTS = [{"name": "small", "source": "/models/small"}, {"name": "big", "source": "/models/big"}]


def router_error(**router) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict({"experts": EXPERTS, "router": router})
    return info.value


def test_defaults():
    config = RouterConfig()
    assert config.enabled is True
    assert (config.artifact, config.default_expert, config.scores) == (None, None, None)
    assert config.fallback_category == "chat"
    assert config.threshold is None and config.budget_params is None
    assert config.pins == {} and config.frequencies == {}
    assert config.stay_margin == 0.2


def test_a_full_router_section_is_read():
    config = from_dict({"experts": EXPERTS, "router": {
        "enabled": False, "artifact": "/r", "default_expert": "small", "fallback_category": "unsure",
        "threshold": 0.4, "scores": "/s.json", "budget_params": 5e8, "pins": {"code": "big"},
        "frequencies": {"code": 2, "math": 0.5}, "stay_margin": 0.0}})
    assert config.router == RouterConfig(False, "/r", "small", "unsure", 0.4, "/s.json", 5e8,
                                         {"code": "big"}, {"code": 2, "math": 0.5}, 0.0)
    assert config.default_expert == "small"


@pytest.mark.parametrize("threshold", [0, 0.0, 1, 0.5, None])
def test_good_thresholds(threshold):
    assert RouterConfig(threshold=threshold).threshold == threshold


@pytest.mark.parametrize("threshold", [-0.01, 1.01, float("nan"), True, "0.5"])
def test_bad_threshold(threshold):
    with pytest.raises(ConfigError) as info:
        RouterConfig(threshold=threshold)
    assert info.value.param == "threshold"
    assert info.value.message.startswith("threshold: expected a number between 0 and 1")


def test_bad_threshold_through_from_dict_names_the_section():
    error = router_error(threshold=2)
    assert error.param == "router.threshold"
    assert error.message == "router.threshold: expected a number between 0 and 1, got 2"


@pytest.mark.parametrize("budget", [0, -1, float("nan"), "lots", "1X", False])
def test_bad_budget_params(budget):
    with pytest.raises(ConfigError) as info:
        RouterConfig(budget_params=budget)
    assert info.value.param == "budget_params"
    assert router_error(budget_params=budget).param == "router.budget_params"


@pytest.mark.parametrize("budget,expected", [(1, 1.0), (1.5e9, 1.5e9), (None, None), ("1B", 1e9),
                                             ("500M", 5e8), ("1.0e9", 1e9), ("2.5k", 2500.0)])
def test_good_budget_params(budget, expected):
    assert RouterConfig(budget_params=budget).budget_params == expected


@pytest.mark.parametrize("pins", [["code", "big"], "code=big", {"code": 3}, {1: "big"}, None])
def test_pins_must_be_a_mapping_of_names(pins):
    with pytest.raises(ConfigError) as info:
        RouterConfig(pins=pins)
    assert info.value.param == "pins"
    assert "a mapping of category -> expert name" in info.value.message


def test_pins_naming_an_unknown_expert():
    error = router_error(pins={"math": "small", "code": "huge"})
    assert error.param == "router.pins.code"
    assert error.message == "router.pins.code: expected one of small, big, got 'huge'"


def test_pins_naming_known_experts_are_accepted():
    config = from_dict({"experts": EXPERTS, "router": {"pins": {"code": "big", "chat": "small"}}})
    assert config.router.pins == {"code": "big", "chat": "small"}


@pytest.mark.parametrize("frequencies", [{"math": -1}, {"math": "often"}, {"math": float("nan")},
                                         ["math"], {"math": True}])
def test_bad_frequencies(frequencies):
    with pytest.raises(ConfigError) as info:
        RouterConfig(frequencies=frequencies)
    assert info.value.param == "frequencies"


@pytest.mark.parametrize("margin", [-0.1, 1.1, None, "0.2"])
def test_bad_stay_margin(margin):
    with pytest.raises(ConfigError) as info:
        RouterConfig(stay_margin=margin)
    assert info.value.param == "stay_margin"


@pytest.mark.parametrize("field,value", [("enabled", "yes"), ("enabled", 1), ("artifact", ""),
                                         ("artifact", 3), ("scores", ""), ("default_expert", ""),
                                         ("fallback_category", ""), ("fallback_category", None)])
def test_bad_other_fields(field, value):
    with pytest.raises(ConfigError) as info:
        RouterConfig(**{field: value})
    assert info.value.param == field


def test_unknown_router_field_is_rejected_by_from_dict():
    error = router_error(treshold=0.5)
    assert error.param == "router.treshold"
    assert "unknown field" in error.message


def test_default_expert_must_be_an_expert():
    error = router_error(default_expert="medium")
    assert error.param == "router.default_expert"
