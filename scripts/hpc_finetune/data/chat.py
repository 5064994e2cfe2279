"""A chat template rendered once per conversation shape (the roles in order) instead of by jinja per row, for the
data stage's token lengths (hpc_finetune.data.tokens): byte for byte what `tokenizer.apply_chat_template(messages,
tokenize=False)` gives, or jinja per row where that cannot be shown.

For a new shape the template is rendered with marker strings as the contents (Probe), which note what the template
does with them. The shape renders once as literal text between the contents when the template only outputs each
content exactly once, as it is or trimmed (`| trim`), concatenated with other strings, and never looks at it (no
test, comparison, length, `in`, slicing or other string method: those make the output depend on the content, and
the shape then goes to jinja per row). Each new shape is also checked against jinja on its first row.
No heavy imports at module level.
"""

from __future__ import annotations

from collections.abc import Callable

MARK = "\ue000{}\ue001"  # private-use characters: any escaping (tojson, replace) of a content changes them
PAD = " \n\t"  # around a marker: shows whether the template trims the content


class Probe(str):
    """A content as the template sees it while a shape is analysed: concatenation and `strip()` (jinja's trim) keep
    the probe; every other string operation marks the render as content-dependent (Probe.looked)."""

    looked = False

    def __add__(self, other):
        return Probe(str.__add__(self, other))

    def __radd__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        return Probe(str.__add__(other, self))

    def strip(self, chars=None):
        if chars is not None:
            Probe.looked = True
        return Probe(str.strip(self, chars))

    def __str__(self):
        return self


def _looks(name: str):
    method = getattr(str, name)

    def looked(self, *args, **kwargs):
        Probe.looked = True
        return method(self, *args, **kwargs)

    return looked


for _name in [n for n in dir(str) if not n.startswith("_") and n != "strip"] + [
    "__len__", "__contains__", "__getitem__", "__iter__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__mod__", "__rmod__", "__mul__", "__rmul__", "__format__", "__hash__",
]:
    setattr(Probe, _name, _looks(_name))


def renderer(tokenizer) -> Callable[[list[list[dict]]], list[str]]:
    """render(conversations): each conversation as apply_chat_template(tokenize=False) renders it."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    def jinja(conversations: list[list[dict]]) -> list[str]:
        return tokenizer.apply_chat_template(conversations, tokenize=False)

    try:
        template = _compile_jinja_template(tokenizer.get_chat_template())
        variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    except Exception:  # noqa: BLE001 - a transformers without these: every row through jinja
        return jinja
    shapes: dict[tuple, list | None] = {}

    def analyse(messages: list[dict]) -> list | None:
        """[(literal, content index, trimmed), ...] + [(tail literal, None, False)] of this shape, or None."""
        def render(padded: int | None = None) -> str | None:
            Probe.looked = False
            probes = [{"role": m["role"], "content": Probe(PAD * (i == padded) + MARK.format(i) + PAD * (i == padded))}
                      for i, m in enumerate(messages)]
            try:
                out = str.__str__(template.render(messages=probes, tools=None, documents=None,
                                                  add_generation_prompt=False, **variables))
            except Exception:  # noqa: BLE001 - the template refuses the shape: jinja per row says why
                return None
            return None if Probe.looked else out

        plain = render()
        marks = [MARK.format(i) for i in range(len(messages))]
        if plain is None or any(plain.count(mark) != 1 for mark in marks) or plain.count("\ue000") != len(marks):
            return None  # a content escaped, left out or output twice
        plan, rest = [], plain
        for i in sorted(range(len(marks)), key=lambda i: plain.index(marks[i])):
            literal, rest = rest.split(marks[i], 1)
            padded = render(i)  # the content as is keeps the padding; trimmed loses it
            trim = padded == plain
            if not trim and padded != plain.replace(marks[i], PAD + marks[i] + PAD):
                return None
            plan.append((literal, i, trim))
        return plan + [(rest, None, False)]

    def fast(messages: list[dict], plan: list) -> str:
        return "".join(
            literal + ("" if i is None else messages[i]["content"].strip() if trim else messages[i]["content"])
            for literal, i, trim in plan
        )

    def render(conversations: list[list[dict]]) -> list[str]:
        out = []
        for messages in conversations:
            key = tuple(m["role"] for m in messages)
            if key not in shapes:
                plan = analyse(messages)
                if plan is not None and fast(messages, plan) != jinja([messages])[0]:
                    plan = None
                shapes[key] = plan
            plan = shapes[key]
            out.append(fast(messages, plan) if plan is not None else jinja([messages])[0])
        return out

    render.plans = shapes  # {shape: how it renders, None: by jinja}; for the tests
    return render
