"""A checkpoint's chat template, stored in the engine and rendered as transformers does.

An engine compiled from an `hf:` checkpoint keeps the checkpoint's chat template (from
chat_template.jinja, else tokenizer_config.json's `chat_template`) and the special
tokens a template may name (`bos_token`, `eos_token`, ...), as the JSON of the engine
file's `chat` metadata entry. `render` gives the text transformers'
`tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`
gives: the same sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop
controls), the same globals and `tojson` filter, the same message clean-up; encode it
without adding special tokens, as transformers does. `tilec serve` uses it for
/v1/chat/completions.

A chat template is code from the checkpoint: it runs in Jinja's immutable sandbox
(jinja2 >= 3.1.6, the release transformers requires for it too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from tilec.errors import EngineError

# The names transformers passes to a template (PreTrainedTokenizerBase.special_tokens_map)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
# A message's reasoning under the names templates read it by (transformers aliases them)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclass(frozen=True)
class ChatTemplate:
    template: str
    special_tokens: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"template": self.template, "special_tokens": self.special_tokens},
                          sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ChatTemplate:
        """The engine's `chat` entry, checked: an EngineError says what is wrong."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise EngineError(f"malformed chat template entry: {e}") from None
        if not (isinstance(data, dict) and set(data) == {"template", "special_tokens"}
                and isinstance(data["template"], str)
                and isinstance(data["special_tokens"], dict)
                and all(k in SPECIAL_TOKEN_NAMES and isinstance(v, str)
                        for k, v in data["special_tokens"].items())):
            raise EngineError("malformed chat template entry: expected {template: str, "
                              "special_tokens: {name: str}}")
        return ChatTemplate(data["template"], dict(data["special_tokens"]))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (OpenAI/transformers shape: dicts with a role
        and content). A template that raises (its own `raise_exception`, or a sandbox
        violation) raises jinja2's TemplateError."""
        messages = [_aliased({k: v for k, v in m.items() if v is not None}) for m in messages]
        return _compiled(self.template).render(
            messages=messages, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **self.special_tokens)


def _aliased(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=8)
def _compiled(template: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:   # `dict(...)` in a template, without the type's attributes
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # no underscore attributes: nothing reaches the interpreter's internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore attributes on a namespace: {name!r}")

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks the assistant's text for
        # transformers' assistant mask; rendering, it is its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body) \
                .set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)
