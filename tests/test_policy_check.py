"""``ia policy check`` knows the actuators: action types, their params, what cannot work.

And the README's reference of action params is the declarations' (like the guard table).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from ia.actuators.registry import action_catalog, build_actuators, plugin_spec
from ia.cli import main as cli
from ia.decisions.policy import Policy
from ia.decisions.policy_check import check_actions
from ia.schemas.actions import BUILTIN_ACTIONS, ParamSpec, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def problems(yaml_text: str, catalog=BUILTIN_ACTIONS) -> list[str]:
    policy = Policy.from_text(textwrap.dedent(yaml_text), "p.yaml")
    found, _ = check_actions(policy, catalog)
    return [str(p) for p in found]


def one_rule(action: str, extra: str = "") -> str:
    return f"version: 1\nrules:\n  - name: r\n    action: {action}\n{extra}"


def test_a_misspelled_action_type_is_refused_with_line_and_suggestion() -> None:
    (found,) = problems(one_rule("{type: webhok, params: {url: 'https://h/x'}}"))
    assert found.startswith("p.yaml:4: rule 'r': unknown action type 'webhok'")
    assert "did you mean 'webhook'?" in found


def test_an_unknown_webhook_param_is_refused_with_line_and_suggestion() -> None:
    text = """\
        version: 1
        rules:
          - name: hook
            action:
              type: webhook
              params:
                url: https://hooks.example/ia
                urll: https://hooks.example/other
        """
    (found,) = problems(text)
    assert found.startswith("p.yaml:8: rule 'hook': unknown param 'urll' for action type "
                            "'webhook'; did you mean 'url'?")


@pytest.mark.parametrize(("action", "words"), [
    ("{type: webhook}", "needs param 'url'"),
    ("{type: webhook, params: {url: hooks.example/x}}", "is not a URL"),
    ("{type: webhook, params: {url: 'https://h/{entity}'}}", "is not templated"),
    ("{type: simulator, params: {op: reboot}}", "'reboot' is not one of restart"),
    ("{type: log, params: {verify_within_s: soon, verify_below: 3}}", "'soon' is not a number"),
    ("{type: log, params: {verify_within_s: 0, verify_below: 3}}", "must be > 0"),
    ("{type: log, params: {verify_below: 3}}", "needs verify_within_s"),
    ("{type: log, params: {verify_within_s: 60}}", "needs verify_below and/or verify_above"),
    ("{type: log, params: {verify_within_s: 60, verify_below: 100, verify_above: 200}}",
     "verification always fails"),
    ("{type: log, params: {compensate.op: restart}}", "without compensate"),
    ("{type: log, params: {verify_within_s: 60, verify_below: 1, compensate: simulatr}}",
     "did you mean 'simulator'?"),
    ("{type: log, params: {verify_within_s: 60, verify_below: 1, compensate: simulator}}",
     "needs param 'compensate.op'"),
    ("{type: log, params: {url: {nested: 1}}}", "unknown param 'url'"),
    ("{type: notify, params: {url: {nested: 1}}}", "expected a url, got a mapping"),
])
def test_problems_an_action_would_only_show_when_it_runs(action: str, words: str) -> None:
    (found,) = problems(one_rule(action))
    assert found.startswith("p.yaml:") and words in found, found


def test_what_works_passes() -> None:
    assert problems(one_rule(
        "{type: simulator, params: {op: scale_out, verify_within_s: 120, verify_below: 250, "
        "compensate: notify, compensate.message: 'scale-out on {entity} did not help'}}")) == []
    assert problems(one_rule("{type: webhook, params: {url: 'env:HOOK'}}",
                             "    mode: needs_approval\n    approval: {ttl_s: 60}\n")) == []
    assert problems(one_rule("{type: log}",
                             "    approval: {ttl_s: 60}\n"
                             "    autonomy: {auto_above: 0.9, approval_above: 0.5}\n")) == []


def test_approval_terms_on_a_rule_that_never_asks_are_refused() -> None:
    (found,) = problems(one_rule("{type: log}", "    approval: {ttl_s: 60}\n"))
    assert found.startswith("p.yaml:") and "never asks for approval" in found, found


@pytest.mark.parametrize("path", ["ia/policies/demo.yaml", "ia/policies/observe.yaml",
                                  "ia/policies/empty.yaml", "compose/policy.yaml"])
def test_the_shipped_policies_pass(path: str) -> None:
    found, notes = check_actions(Policy.from_file(ROOT / path), BUILTIN_ACTIONS)
    assert (found, notes) == ([], [])


def test_templated_params_are_filled_in_by_the_worker_the_others_are_not() -> None:
    policy = Policy.from_text(one_rule(
        "{type: notify, params: {message: '{entity} {metric} is odd', channel: '{entity}'}}"))
    r = policy.evaluate(entity="svc-1", metric="cpu", kind="metric", labels={}, features={},
                        score=1.0, confidence=1.0, drift="stable")
    assert r.action.params == {"message": "svc-1 cpu is odd", "channel": "{entity}"}


class DeclaredPlugin:
    """Opens an incident."""

    name = "pager"
    params = {"service": ParamSpec("string", "service id", required=True),
              "note": ParamSpec("string", "", templated=True)}


class UndeclaredPlugin:
    name = "legacy"


def test_plugins_declare_their_params_or_are_noted_unchecked() -> None:
    catalog = {**BUILTIN_ACTIONS, "pager": plugin_spec("pager", DeclaredPlugin),
               "legacy": plugin_spec("legacy", UndeclaredPlugin)}
    assert catalog["pager"].help == "Opens an incident."
    assert not catalog["pager"].params["note"].templated  # the worker cannot fill it in
    unknown, missing = problems(one_rule("{type: pager, params: {servce: x}}"), catalog)
    assert "unknown param 'servce'" in unknown and "did you mean 'service'?" in unknown
    assert "needs param 'service'" in missing
    policy = Policy.from_text(one_rule("{type: legacy, params: {anything: 1}}"), "p.yaml")
    found, notes = check_actions(policy, catalog)
    assert found == [] and "declares no params" in str(notes[0])


def test_the_builtin_actuators_carry_their_declarations() -> None:
    actuators = build_actuators(plugins="none")
    assert set(actuators) == set(BUILTIN_ACTIONS) == set(action_catalog("none"))
    for name, actuator in actuators.items():
        assert actuator.params is BUILTIN_ACTIONS[name].params  # type: ignore[attr-defined]


def test_cli_rejects_each_problem_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - name: a\n    action: {type: webhok}\n"
                    "  - name: b\n    action: {type: webhook, params: {url: 'https://h/x', "
                    "timeout: 3}}\n")
    out = CliRunner().invoke(cli, ["policy", "check", str(path)], env={"IA_ACTUATOR_PLUGINS":
                                                                       "none"})
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line]
    assert lines[0].startswith(f"Error: {path}:4: rule 'a': unknown action type 'webhok'")
    assert lines[1].startswith(f"Error: {path}:6: rule 'b': unknown param 'timeout'")
    assert lines[1].endswith("(2 problems)")
    ok = tmp_path / "ok.yaml"
    ok.write_text(one_rule("{type: webhook, params: {url: 'https://h/x'}}"))
    out = CliRunner().invoke(cli, ["policy", "check", str(ok)])
    assert out.exit_code == 0 and out.output.startswith("ok: ")


def readme_reference() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- action reference: begin[^>]*-->\n(.*?)\n<!-- action reference: "
                      r"end -->", text, re.DOTALL)
    assert found, "README has no generated action reference"
    return found.group(1)


def test_the_readme_reference_is_the_declarations() -> None:
    assert readme_reference() == reference_markdown(), \
        "README's action reference is stale: paste `ia policy actions --markdown`"
    assert "`url` | url (required)" in readme_reference()
