"""Prompt templates behind one small interface, for both data paths.

* T0 path: promptsource 0.2.3 templates (wrapped, never copied). promptsource imports
  `pkg_resources`, which setuptools>=82 no longer ships, so a 10-line shim is installed first.
* Embedded benchmark: templates written in the same Jinja dialect (``input ||| target``,
  ``answer_choices`` a ``|||``-separated Jinja expression) and stored in
  ``data/benchmark/templates.yaml``; rendered by :class:`JinjaTemplate`, which needs only jinja2.

Rendering turns a raw example into an :class:`Example` or reports "not applicable" (None), which
is how promptsource marks templates that do not fit an example (``{% if ... %}`` around the body).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import random
import sys
import types
from dataclasses import dataclass

import jinja2

from .example import DataError, Example

PIPE = "|||"


def install_pkg_resources_shim() -> bool:
    """Make ``import pkg_resources`` work without setuptools<82. Returns True if the shim was used."""
    try:
        import pkg_resources  # noqa: F401
        return False
    except ImportError:
        pass
    shim = types.ModuleType("pkg_resources")

    def resource_filename(package_or_requirement, resource_name):
        mod = sys.modules.get(package_or_requirement)
        origin = mod.__file__ if mod is not None else importlib.util.find_spec(package_or_requirement).origin
        return os.path.join(os.path.dirname(origin), resource_name)

    shim.resource_filename = resource_filename
    sys.modules["pkg_resources"] = shim
    return True


@contextlib.contextmanager
def seeded_python_random(key: str):
    """Templates that use promptsource's ``choice`` filter draw from Python's global ``random``.
    Seed it from a stable key (template + example) so rendering is reproducible, and restore the
    caller's state afterwards."""
    state = random.getstate()
    random.seed(int(hashlib.md5(key.encode()).hexdigest()[:16], 16))
    try:
        yield
    finally:
        random.setstate(state)


@dataclass
class PromptTemplate:
    """What the pipeline needs from a template, whatever its origin."""

    dataset: str  # registry name, e.g. "super_glue/rte"
    name: str
    original_task: bool
    has_choices: bool
    _impl: object  # promptsource Template or JinjaTemplate

    @property
    def task_name(self) -> str:
        """(dataset, template) task key, as in mttl's `use_t0_templates_as_tasks`."""
        return f"{self.dataset}/{self.name}"

    def render_raw(self, example: dict) -> tuple[list[str], list[str] | None]:
        """Return (parts split on |||, answer choices or None). Deterministic for a given example."""
        key = f"{self.task_name}|{sorted(example.items())!r}"
        with seeded_python_random(key):
            parts = self._impl.apply(example)
            choices = self._impl.get_answer_choices_list(example) if self.has_choices else None
        return parts, choices

    def render(self, example: dict, task: str, idx: int = -1, strict: bool = False) -> Example | None:
        """Render one raw example. Non-applicable -> None (or DataError when ``strict``, which is what
        evaluation wants: a held-out template must render every example)."""
        where = f"dataset {self.dataset!r}, template {self.name!r}, example {idx}"
        try:
            parts, choices = self.render_raw(example)
        except Exception as e:  # jinja errors carry no context: add it
            raise DataError(f"{where}: template failed to render: {type(e).__name__}: {e}") from e
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            if strict:
                raise DataError(f"{where}: template renders empty (not applicable to this example)")
            return None
        inp, tgt = parts
        label = None
        if choices is not None:
            if any(not c for c in choices):
                if strict:
                    raise DataError(f"{where}: an answer choice renders empty: {choices!r}")
                return None
            if tgt in choices:
                label = choices.index(tgt)
            elif strict:
                raise DataError(f"{where}: target {tgt!r} is not one of the answer choices {choices!r}")
            # else: a training pair whose target is not a choice (e.g. imdb "Negation template" appends
            # " review."): still a valid LM example, with label None
        return Example(input=inp, target=tgt, answer_choices=choices, label=label, task=task,
                       dataset=self.dataset, template=self.name, idx=idx)


# ----------------------------------------------------------------------------- promptsource
def _split_name(dataset: str) -> tuple[str, str | None]:
    name, _, subset = dataset.partition("/")
    return name, (subset or None)


def promptsource_templates(dataset: str, template_dataset: str | None = None) -> list[PromptTemplate]:
    """All promptsource templates of ``dataset`` (``name`` or ``name/subset``), sorted by name.
    ``template_dataset`` overrides where the templates live (ANLI's three rounds share ``anli``)."""
    install_pkg_resources_shim()
    from promptsource.templates import DatasetTemplates  # imported late: slow, needs the shim

    name, subset = _split_name(template_dataset or dataset)
    coll = DatasetTemplates(name, subset)
    names = sorted(coll.all_template_names)
    if not names:
        raise DataError(f"dataset {dataset!r}: promptsource has no templates for {name}/{subset}")
    out = []
    for n in names:
        t = coll[n]
        out.append(PromptTemplate(dataset=dataset, name=n, original_task=bool(t.metadata.original_task),
                                  has_choices=t.answer_choices is not None, _impl=t))
    return out


# ----------------------------------------------------------------------------- own Jinja templates
def _choice(seq):
    return random.choice(list(seq))


_ENV = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
_ENV.filters["choice"] = _choice


class JinjaTemplate:
    """promptsource's rendering rules (``|||`` split, answer_choices variable) with StrictUndefined,
    so a misspelt field is an error instead of silently empty text."""

    def __init__(self, jinja: str, answer_choices: str | None):
        self.jinja = jinja
        self.answer_choices = answer_choices
        self._t = _ENV.from_string(jinja)
        self._c = _ENV.from_string(answer_choices) if answer_choices else None

    def get_answer_choices_list(self, example: dict):
        if self._c is None:
            return None
        return [c.strip() for c in self._c.render(**example).split(PIPE)]

    def apply(self, example: dict):
        if "answer_choices" in example:
            raise DataError("example contains the restricted key 'answer_choices'")
        rendered = self._t.render(**example, answer_choices=self.get_answer_choices_list(example))
        return [p.strip() for p in rendered.split(PIPE)]


def jinja_templates(dataset: str, specs: list[dict]) -> list[PromptTemplate]:
    """Build templates from YAML specs: ``{name, jinja, answer_choices?, original_task?}``."""
    out = []
    for s in sorted(specs, key=lambda s: s["name"]):
        try:
            impl = JinjaTemplate(s["jinja"], s.get("answer_choices"))
        except (KeyError, jinja2.TemplateError) as e:
            raise DataError(f"dataset {dataset!r}, template {s.get('name')!r}: bad template spec: {e}") from e
        out.append(PromptTemplate(dataset=dataset, name=s["name"], original_task=bool(s.get("original_task", True)),
                                  has_choices=bool(s.get("answer_choices")), _impl=impl))
    return out
