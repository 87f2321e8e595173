"""Chat templates rendered as transformers' apply_chat_template(tokenize=False) renders them, and a
history that keeps the most recent turns within a token budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from flashio.chat_template import ChatTemplate, ChatTemplateError, History, fit_messages

DEMO = Path(__file__).resolve().parents[2] / "tasks" / "demo" / "opt-stdlib"
transformers = pytest.importorskip("transformers")

# Llama 3.2 Instruct's template (abridged: the tool-call branches left out; strftime_now, tojson(indent=4) kept)
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Gemma 3's template (text parts only): the system prompt joins the first user turn; roles must alternate
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# Qwen2.5's ChatML template (tools, tool calls through tojson, tool responses)
CHATML = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# loop controls, namespace and dict, as some templates use them
CONTROLS = """{%- set ns = namespace(n=0, last='') -%}
{%- for m in messages -%}
{%- if m.role == 'system' %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}{%- set ns.last = m.role -%}
[{{ ns.n }}:{{ m.role }}] {{ m.content }}
{% if ns.n >= 3 %}{% break %}{% endif -%}
{%- endfor -%}
{{ dict(a=1, b=ns.last) | tojson(sort_keys=True, separators=(',', ':')) }}{{ eos_token }}
"""

SYSTEM = {"role": "system", "content": "  You are terse. Réponds en français si besoin.  "}
HISTORY = [
    {"role": "user", "content": "Hello there! 😀"},
    {"role": "assistant", "content": "Hi. How can I help?"},
    {"role": "user", "content": "What's 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in words, with <b>tags</b> & quotes \"?"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Météo d'une ville",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_CALL = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "{\"temp_c\": 21}"},
]

SPECIALS = {"llama3": ("<|begin_of_text|>", "<|eot_id|>"), "gemma": ("<bos>", "<eos>"),
            "chatml": (None, "<|im_end|>"), "controls": ("<s>", "</s>")}
TEMPLATES = {"llama3": LLAMA3, "gemma": GEMMA, "chatml": CHATML, "controls": CONTROLS}


def _hf_tokenizer(name: str):
    bos, eos = SPECIALS[name]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(DEMO / "tokenizer.json")),
                                               bos_token=bos, eos_token=eos, chat_template=TEMPLATES[name])
    return tok


def _ours(name: str) -> ChatTemplate:
    bos, eos = SPECIALS[name]
    cfg = {"chat_template": TEMPLATES[name], "eos_token": {"content": eos, "special": True, "__type": "AddedToken"}}
    if bos is not None:
        cfg["bos_token"] = bos
    return ChatTemplate.from_tokenizer_config(cfg)


CASES = [
    ("one user turn", [HISTORY[0]], {}),
    ("system + multi-turn", [SYSTEM, *HISTORY], {}),
    ("multi-turn, no system", HISTORY, {}),
    ("content parts", [{"role": "user", "content": [{"type": "text", "text": " parts "}]}], {}),
    ("tools", [SYSTEM, *TOOL_CALL], {"tools": TOOLS}),
]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case,messages,extra", CASES, ids=[c[0] for c in CASES])
def test_render_matches_transformers(name, add_generation_prompt, case, messages, extra):
    hf = _hf_tokenizer(name)
    try:
        ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
    except Exception as exc:  # the template refuses this conversation: so must ours, for the same reason
        with pytest.raises(ChatTemplateError, match=r"refused|failed") as ours_exc:
            _ours(name).render(messages, add_generation_prompt=add_generation_prompt, **extra)
        assert str(exc).split(":")[-1].strip() in str(ours_exc.value)
        return
    ours = _ours(name).render(messages, add_generation_prompt=add_generation_prompt, **extra)
    assert ours == ref
    assert len(ours) > 20


def test_the_cases_exercise_the_templates():
    """What the comparison covers: system prompts, generation prompts, tojson, refusals, loop controls."""
    gemma = _ours("gemma").render([SYSTEM, *HISTORY])
    assert gemma.startswith("<bos><start_of_turn>user\n  You are terse.") and gemma.endswith("<start_of_turn>model\n")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        _ours("gemma").render([HISTORY[0], HISTORY[0]])
    chatml = _ours("chatml").render([SYSTEM, *TOOL_CALL], tools=TOOLS)
    assert '"description": "Météo d\'une ville"' in chatml  # tojson without ASCII or HTML escaping
    assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in chatml
    llama = _ours("llama3").render([SYSTEM, HISTORY[0]], tools=TOOLS, date_string="01 Jan 2025")
    assert 'Today Date: 01 Jan 2025' in llama and '    "type": "function"' in llama
    assert _ours("controls").render([SYSTEM, *HISTORY]) == (
        '[1:user] Hello there! 😀\n[2:assistant] Hi. How can I help?\n[3:user] What\'s 2+2?\n'
        '{"a":1,"b":"user"}</s>')


def test_the_sandbox_refuses_python_internals():
    for src in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace(__x=1) %}x",
                "{{ messages.append(1) }}"):
        with pytest.raises(ChatTemplateError, match=r"sandbox forbids|refused"):
            ChatTemplate(src).render([HISTORY[0]])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_loading_from_an_artifact_directory(tmp_path):
    cfg = json.loads((DEMO / "tokenizer_config.json").read_text())
    assert ChatTemplate.from_directory(DEMO) is None  # the demo source has no chat format
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    t = ChatTemplate.from_directory(tmp_path)
    assert t.special_tokens == {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    assert t.source == CHATML
    (tmp_path / "chat_template.jinja").write_text(GEMMA)
    assert ChatTemplate.from_directory(tmp_path).render([HISTORY[0]]).startswith("</s><start_of_turn>user")
    named = {**cfg, "chat_template": [{"name": "default", "template": LLAMA3}, {"name": "tool_use", "template": CHATML}]}
    assert ChatTemplate.from_tokenizer_config(named).source == LLAMA3
    assert ChatTemplate.from_tokenizer_config(named, name="tool_use").source == CHATML
    with pytest.raises(ChatTemplateError, match="not 'rag'"):
        ChatTemplate.from_tokenizer_config(named, name="rag")
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ChatTemplate.from_tokenizer_config(DEMO / "tokenizer_config.json")


def _counter():
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def test_history_keeps_the_system_prompt_and_the_latest_turns_that_fit():
    template, count = _ours("chatml"), _counter()
    full = [SYSTEM, *HISTORY]
    n_full = count(template.render(full))
    assert fit_messages(full, template, count, n_full) == full
    kept = fit_messages(full, template, count, n_full - 1)
    assert kept == [SYSTEM, *HISTORY[2:]]  # dropped a whole turn, starting again at a user message
    only_last = count(template.render([SYSTEM, HISTORY[-1]]))
    assert fit_messages(full, template, count, only_last) == [SYSTEM, HISTORY[-1]]
    with pytest.raises(ChatTemplateError, match=f"take {only_last} tokens; the budget for the prompt is"):
        fit_messages(full, template, count, only_last - 1)

    h = History(template, count, budget_tokens=only_last + 40, system=SYSTEM["content"])
    for m in HISTORY:
        h.add(m["role"], m["content"])
    msgs = h.messages()
    assert msgs[0] == SYSTEM and msgs[-1] == HISTORY[-1] and len(msgs) < len(full)
    assert count(h.prompt()) <= only_last + 40 and h.prompt() == template.render(msgs)
    h.reset()
    h.add("user", "again")
    assert h.messages() == [SYSTEM, {"role": "user", "content": "again"}]
    with pytest.raises(ChatTemplateError, match="lower max_new_tokens"):
        History(template, count, budget_tokens=0)
