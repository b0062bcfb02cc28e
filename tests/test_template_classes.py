"""Issue 21 item 1(a): a template dict may only name registered template classes.

A run record, YAML config or ``data.template`` naming ``{"class": "module:Name"}`` must not make lorakit
import and call arbitrary code: an unregistered class path is refused before its module is imported.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import attrs
import pytest

from lorakit.errors import ConfigError, LorakitError
from lorakit.templates import (
    TEMPLATE_CLASSES,
    ModelTemplate,
    get_template,
    register_template_class,
    template_from_dict,
)

REFUSED = r"Template class '{}' is not a registered template class, so it was not imported"


@attrs.frozen
class UnregisteredTemplate:
    """A protocol-satisfying template that nobody registered."""

    name: str = "unregistered"

    def render(self, messages: Any, *, tokenizer: Any, add_generation_prompt: bool = False) -> list:
        return [(m["content"], m["role"] == "assistant") for m in messages]

    def stop_strings(self, tokenizer: Any) -> list[str]:
        return []

    def to_dict(self) -> dict[str, Any]:
        return {"class": f"{__name__}:UnregisteredTemplate", "name": self.name}


@attrs.frozen
class LaterRegisteredTemplate(UnregisteredTemplate):
    name: str = "later"

    def to_dict(self) -> dict[str, Any]:
        return {"class": f"{__name__}:LaterRegisteredTemplate", "name": self.name}


@pytest.mark.parametrize(
    "spec_of", [template_from_dict, get_template], ids=["template_from_dict", "get_template"]
)
def test_subprocess_run_is_refused_and_runs_nothing(tmp_path, spec_of):
    marker = tmp_path / "pwned"
    spec = {"class": "subprocess:run", "args": [["touch", str(marker)]]}
    with pytest.raises(ConfigError, match=REFUSED.format("subprocess:run")) as caught:
        spec_of(spec)
    assert isinstance(caught.value, LorakitError)
    assert "register_template_class" in str(caught.value)
    assert "trust_template_classes=True" in str(caught.value)
    assert not marker.exists()


def test_os_system_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match=REFUSED.format("os:system")):
        template_from_dict({"class": "os:system", "command": f"touch {marker}"})
    assert not marker.exists()


def test_the_check_happens_before_the_module_is_imported():
    module = "lorakit_never_imported_module_xyz"
    sys.modules.pop(module, None)
    with pytest.raises(ConfigError, match=REFUSED.format(f"{module}:Anything")):
        template_from_dict({"class": f"{module}:Anything"})
    assert module not in sys.modules


def test_trust_does_not_call_a_non_class(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(
        ConfigError, match=r"Template class 'subprocess:run' is not a template class .* not called"
    ):
        template_from_dict(
            {"class": "subprocess:run", "args": [["touch", str(marker)]]}, trust_template_classes=True
        )
    assert not marker.exists()


def test_builtin_classes_are_registered():
    assert TEMPLATE_CLASSES["lorakit.templates.model:ModelTemplate"] is ModelTemplate
    rebuilt = template_from_dict(
        json.loads(json.dumps(ModelTemplate(name="j", chat_template="{{ x }}").to_dict()))
    )
    assert rebuilt == ModelTemplate(name="j", chat_template="{{ x }}")


def test_unregistered_class_needs_the_opt_in():
    data = json.loads(json.dumps(UnregisteredTemplate(name="u").to_dict()))
    with pytest.raises(ConfigError, match=REFUSED.format(f"{__name__}:UnregisteredTemplate")):
        template_from_dict(data)
    with pytest.raises(ConfigError, match=REFUSED.format(f"{__name__}:UnregisteredTemplate")):
        get_template(data)
    assert template_from_dict(data, trust_template_classes=True) == UnregisteredTemplate(name="u")
    assert get_template(data, trust_template_classes=True) == UnregisteredTemplate(name="u")
    assert f"{__name__}:UnregisteredTemplate" not in TEMPLATE_CLASSES  # trusting does not register


def test_registered_class_round_trips_without_opt_in():
    data = json.loads(json.dumps(LaterRegisteredTemplate().to_dict()))
    with pytest.raises(ConfigError, match="not a registered template class"):
        template_from_dict(data)
    path = f"{__name__}:LaterRegisteredTemplate"
    try:
        assert register_template_class(LaterRegisteredTemplate) is LaterRegisteredTemplate
        assert TEMPLATE_CLASSES[path] is LaterRegisteredTemplate
        rebuilt = template_from_dict(data)
        assert rebuilt == LaterRegisteredTemplate()
        assert type(rebuilt) is LaterRegisteredTemplate
    finally:
        TEMPLATE_CLASSES.pop(path, None)


@pytest.mark.parametrize("bad", [print, "subprocess:run", 3, object])
def test_register_template_class_rejects_non_templates(bad):
    with pytest.raises(ConfigError, match=r"register_template_class\(\) needs a template class"):
        register_template_class(bad)
