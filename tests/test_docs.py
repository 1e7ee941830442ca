"""The documentation tells the truth.

Every hook in `sdjobs.hookspecs` has a section in docs/hooks.md with its exact
signature and the four answers a plugin author needs; every hook has a test of its
own; every code example implements real hooks and imports real names; and the plugin
guide's plugin, its JSON listing and its tests work exactly as written.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import tomllib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sdjobs import hookimpl, hookspecs
from sdjobs.frontend import FrontendOptions, collect_frontends
from sdjobs.hooks import Hooks, describe_plugins

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
HOOKS_PAGE = DOCS / "hooks.md"
GUIDE = DOCS / "plugins.md"

#: Every hook spec, by name: what the documentation is checked against.
HOOKS: dict[str, Callable[..., Any]] = {
    name: function
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(function, f"{hookspecs.PROJECT}_spec")
}

#: What each hook's section must answer, as bold labels.
QUESTIONS = ("**When:**", "**Thread:**", "**Returns:**", "**Raising:**")


# -------------------------------------------------------------------------
# Reading the pages
# -------------------------------------------------------------------------


def code_blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def sections(text: str) -> dict[str, str]:
    """Each `## ` heading's text (without backticks) and the body below it."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {heading.strip().strip("`"): body for heading, body in zip(parts[1::2], parts[2::2])}


def named_block(text: str, language: str, filename: str) -> str:
    """The block that starts with the comment line ``# filename``."""
    [block] = [b for b in code_blocks(text, language) if b.startswith(f"# {filename}\n")]
    return block


def decorated_functions(source: str, decorator: str) -> list[ast.FunctionDef]:
    """Functions and methods in ``source`` marked ``@decorator`` or ``@decorator(...)``."""
    return [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(d).split("(")[0] == decorator for d in node.decorator_list)
    ]


def marked_functions(text: str, decorator: str) -> list[ast.FunctionDef]:
    """The functions marked ``@decorator`` in every Python block of ``text``."""
    return [node for block in code_blocks(text, "python") for node in decorated_functions(block, decorator)]


def all_python_blocks() -> list[tuple[str, str]]:
    """``(page name, block)`` for every Python block of every page."""
    return [(page.name, block) for page in PAGES for block in code_blocks(page.read_text(), "python")]


# -------------------------------------------------------------------------
# Signatures, written the same way from the code and from the page
# -------------------------------------------------------------------------


def _annotation(text: str) -> str:
    return ast.unparse(ast.parse(text, mode="eval"))


def code_signature(hook: Callable[..., Any]) -> str:
    """``@hookspec(...)`` and the ``def`` line of a hook, as the page must write them."""
    options = getattr(hook, f"{hookspecs.PROJECT}_spec")
    set_options = ", ".join(f"{key}={value!r}" for key, value in options.items() if value)
    decorator = f"@hookspec({set_options})" if set_options else "@hookspec"
    signature = inspect.signature(hook)
    parameters = ", ".join(
        f"{p.name}: {_annotation(p.annotation)}" for p in signature.parameters.values()
    )
    return f"{decorator}\ndef {hook.__name__}({parameters}) -> {_annotation(signature.return_annotation)}"


def documented_signature(node: ast.FunctionDef) -> str:
    [decorator] = node.decorator_list
    parameters = ", ".join(f"{arg.arg}: {ast.unparse(arg.annotation)}" for arg in node.args.args)
    returns = ast.unparse(node.returns) if node.returns else "(none)"
    return f"@{ast.unparse(decorator)}\ndef {node.name}({parameters}) -> {returns}"


# -------------------------------------------------------------------------
# The hook reference
# -------------------------------------------------------------------------


def test_the_hook_reference_has_a_section_for_each_hook_and_no_other():
    documented = {heading for heading in sections(HOOKS_PAGE.read_text()) if heading.startswith("sdjobs_")}
    assert documented == set(HOOKS)


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_hook_is_documented_with_its_exact_signature(hook):
    section = sections(HOOKS_PAGE.read_text()).get(hook, "")
    specs = marked_functions(section, "hookspec")
    assert [node.name for node in specs] == [hook], f"docs/hooks.md: no hookspec block for {hook}"
    assert documented_signature(specs[0]) == code_signature(HOOKS[hook])


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_hook_section_answers_when_thread_return_and_raising_with_an_example(hook):
    section = sections(HOOKS_PAGE.read_text()).get(hook, "")
    assert [question for question in QUESTIONS if question not in section] == []
    assert hook in [node.name for node in marked_functions(section, "hookimpl")]


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_hook_has_a_test_of_its_own(hook):
    """A test module other than this one names the hook in full: implements it or asserts on it.

    Only `test_*.py` files count: a helper that fires or records every hook is no
    test of any of them.
    """
    naming = [
        path
        for path in Path(__file__).parent.rglob("test_*.py")
        if path.name != Path(__file__).name and re.search(rf"\b{hook}\b", path.read_text())
    ]
    assert naming, f"no test module under tests/ names {hook}"


# -------------------------------------------------------------------------
# Every example
# -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("page", "block"),
    [pytest.param(page, block, id=f"{page}-{i}") for i, (page, block) in enumerate(all_python_blocks())],
)
def test_python_examples_are_valid_python(page, block):
    ast.parse(block, filename=page)


def test_every_example_hookimpl_implements_a_hook_with_a_subset_of_its_arguments():
    wrong = []
    for page, block in all_python_blocks():
        for node in decorated_functions(block, "hookimpl"):
            arguments = [arg.arg for arg in node.args.args if arg.arg != "self"]
            spec = HOOKS.get(node.name)
            if spec is None or not set(arguments) <= set(inspect.signature(spec).parameters):
                wrong.append(f"{page}: {node.name}({', '.join(arguments)})")
    assert wrong == []


def test_every_sdjobs_name_the_examples_import_exists():
    missing = []
    for page, block in all_python_blocks():
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sdjobs":
                module = importlib.import_module(node.module)
                missing += [
                    f"{page}: {node.module}.{alias.name}"
                    for alias in node.names
                    if not hasattr(module, alias.name)
                ]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "sdjobs":
                        importlib.import_module(alias.name)
    assert missing == []


# -------------------------------------------------------------------------
# The plugin guide, as a reader follows it
# -------------------------------------------------------------------------


def guide_module(name: str) -> Any:
    """Import a module the guide writes out, from the guide's own text."""
    source = named_block(GUIDE.read_text(), "python", f"{name}.py")
    module = types.ModuleType(name)
    exec(compile(source, f"docs/plugins.md:{name}.py", "exec"), module.__dict__)
    return module


def test_the_guide_registers_its_module_under_the_entry_point_group_sdjobs():
    [project] = [tomllib.loads(b) for b in code_blocks(GUIDE.read_text(), "toml") if "[project]" in b]
    assert project["project"]["entry-points"][hookspecs.PROJECT] == {"lora": "sdjobs_lora"}
    assert project["tool"]["setuptools"]["py-modules"] == ["sdjobs_lora"]


def test_sdjobs_plugins_prints_what_the_guide_shows(plugin_manager):
    plugin_manager.register(guide_module("sdjobs_lora"), name="lora")
    owners = {name: found.plugin for name, found in collect_frontends(Hooks(plugin_manager)).items()}
    [shown] = [json.loads(b) for b in code_blocks(GUIDE.read_text(), "json")]
    assert describe_plugins(plugin_manager, owners) == shown


#: A warning about a misspelled hook, as a page shows it.
MISSPELLED = re.compile(r"^sdjobs: warning: (plugin '(\w+)' skipped: it implements (\w+), which .*)$", re.MULTILINE)


@pytest.mark.parametrize(
    ("page", "shown", "plugin", "hook"),
    [(page.name, *found.groups()) for page in PAGES for found in MISSPELLED.finditer(page.read_text())],
)
def test_a_misspelled_hook_is_reported_as_the_pages_show(plugin_manager, page, shown, plugin, hook):
    module = types.ModuleType(plugin)
    setattr(module, hook, hookimpl(lambda status: None))
    plugin_manager.load(plugin, lambda: module)
    assert [str(failure) for failure in plugin_manager.failures] == [shown]


def test_the_guides_front_end_is_offered_by_its_plugin(plugin_manager):
    [toml] = [block for block in code_blocks(GUIDE.read_text(), "toml") if "dots" in block]
    assert tomllib.loads(toml)["project"]["entry-points"] == {hookspecs.PROJECT: {"dots": "sdjobs_dots"}}
    plugin_manager.register(guide_module("sdjobs_dots"), name="dots")
    found = collect_frontends(Hooks(plugin_manager))["dots"]
    assert plugin_manager.failures == []
    assert (found.plugin, found.cls.description) == ("dots", "a dot per progress update")
    plugin_manager.register(found.cls(FrontendOptions()), name=found.plugin_name)
    listed = {plugin["name"]: plugin["hooks"] for plugin in describe_plugins(plugin_manager)["loaded"]}
    assert listed["frontend:dots"] == ["sdjobs_job_finished", "sdjobs_progress"]


def test_the_guides_plugin_passes_the_guides_tests(pytester):
    text = GUIDE.read_text()
    pytester.makepyfile(
        sdjobs_lora=named_block(text, "python", "sdjobs_lora.py"),
        test_sdjobs_lora=named_block(text, "python", "test_sdjobs_lora.py"),
        test_sdjobs_lora_rules=named_block(text, "python", "test_sdjobs_lora_rules.py"),
    )
    result = pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
