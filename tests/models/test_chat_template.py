"""A checkpoint's chat template, read as transformers reads it (chat_template.jinja,
tokenizer_config.json's string or named list, special tokens as strings or added-token
objects), renders exactly what transformers' apply_chat_template renders."""
from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tilec.errors import ConfigError  # noqa: E402
from tilec.models.hf import chat_template  # noqa: E402


RICH_TEMPLATE = """{%- set ns = namespace(found=false) -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% set ns.found = true %}{% continue %}{% endif -%}
  {{ '<|' + m.role + '|>' }}{{ m.content | tojson }}
  {%- if m.reasoning_content is defined %} [{{ m.reasoning_content }}]{% endif %}
  {%- if loop.index > 6 %}{% break %}{% endif %}
{% endfor -%}
{{ dict(system=ns.found, n=messages | length) | tojson }}
{%- if add_generation_prompt %}{% generation %}<|assistant|>{% endgeneration %}{% endif -%}
{{ eos_token if false else '' }}"""
CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be <brief> & \"exact\""},
     {"role": "user", "content": "héllo → 世界"},
     {"role": "assistant", "content": "hi", "reasoning": "said hi"},
     {"role": "user", "content": "  padded  ", "name": None}],
    [{"role": "user", "content": [{"type": "text", "text": "parts"}]}] * 8,
]


def save_tokenizer(folder, config_edit):
    """A word-level tokenizer as transformers saves one, its tokenizer_config.json edited."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hello": 1},
                                                          unk_token="<unk>"))
    tok.add_special_tokens(["<s>", "</s>"])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                         eos_token="</s>").save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config_edit(config)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("stored", ["jinja file", "config string", "config list",
                                    "added-token dicts"])
def test_chat_template_renders_as_transformers(tmp_path, stored):
    folder = tmp_path / "tok"
    if stored == "jinja file":
        save_tokenizer(folder, lambda c: None)
        (folder / "chat_template.jinja").write_text(RICH_TEMPLATE)
    elif stored == "config string":
        save_tokenizer(folder, lambda c: c.update(chat_template=RICH_TEMPLATE))
    elif stored == "config list":
        save_tokenizer(folder, lambda c: c.update(chat_template=[
            {"name": "rag", "template": "{{ 'wrong' }}"},
            {"name": "default", "template": RICH_TEMPLATE}]))
    else:
        save_tokenizer(folder, lambda c: c.update(
            chat_template=RICH_TEMPLATE,
            eos_token={"__type": "AddedToken", "content": "</s>", "special": True}))
    ours = chat_template(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)
        assert ours.render(messages) == expected
    assert ours.special_tokens["eos_token"] == "</s>"


def test_no_template_is_none_and_a_malformed_one_is_one_error(tmp_path):
    folder = tmp_path / "tok"
    save_tokenizer(folder, lambda c: None)
    assert chat_template(folder) is None
    (folder / "tokenizer_config.json").write_text('{"chat_template": 5}')
    with pytest.raises(ConfigError, match="chat_template: expected a string"):
        chat_template(folder)
    (folder / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="tokenizer_config.json: not valid JSON"):
        chat_template(folder)
