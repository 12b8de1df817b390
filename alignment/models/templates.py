"""Chat templates the framework can set by name (`model.tokenizer.chat_template`).

Both carry `{% generation %}` markers so TRL can build assistant-only masks, and rendering a prompt
with `add_generation_prompt` gives an exact text prefix of the prompt followed by its answer, which
DPO's prompt/completion split relies on (the data linter checks it on real rows).
"""

from __future__ import annotations

# ChatML, as the Qwen2.5 instruct models use it.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Zephyr's template (the dSFT/dDPO recipe on Mistral-7B): role tags, each turn closed by the EOS token,
# BOS once at the start because the recipe renders text first and tokenizes it without special tokens.
ZEPHYR_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

TEMPLATES = {"chatml": CHATML_TEMPLATE, "zephyr": ZEPHYR_TEMPLATE}
