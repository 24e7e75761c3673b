"""Prompt text -> token ids, optionally through the tokenizer's chat template (``data.chat_template``).

Instruct models are trained on their chat format; a bare prompt is out of distribution for them.
With ``data.chat_template=true`` each prompt becomes one user turn and the template's generation
prompt (the assistant header) is appended, so the rollout samples the assistant's answer::

    ids = encode_prompt(tok, "12+7=", chat_template=True)
    # Qwen2.5: "<|im_start|>user\\n12+7=<|im_end|>\\n<|im_start|>assistant\\n" as ids

The rendered text is tokenized without adding special tokens: a template that wants a BOS writes
it itself (Llama 3's does), so it is never doubled. A tokenizer without a template is refused
before any work starts (:func:`check_chat_template`, called by the config's file checks).
"""
from __future__ import annotations

from megatron_rl.errors import ConfigError


def render_prompt(tokenizer, prompt: str) -> str:
    """The chat-template text of ``prompt`` as one user turn, ending with the assistant header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def encode_prompt(tokenizer, prompt: str, *, chat_template: bool) -> list[int]:
    """Token ids of ``prompt``: through the chat template when ``chat_template``, else plainly."""
    if not chat_template:
        return list(tokenizer(prompt).input_ids)
    return list(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False).input_ids)


def check_chat_template(tokenizer_path: str) -> None:
    """Refuse ``data.chat_template=true`` when the tokenizer at ``tokenizer_path`` has no template."""
    from transformers import AutoTokenizer  # lazy: config checks load a tokenizer only when the key is on

    if getattr(AutoTokenizer.from_pretrained(tokenizer_path), "chat_template", None):
        return
    raise ConfigError(f"config error: data.chat_template: true, but the tokenizer of model.hf_path={tokenizer_path!r} "
                      "has no chat template; fix: set data.chat_template=false (base models, the tiny model), or use "
                      "an instruct model's tokenizer (its tokenizer_config.json or chat_template.jinja has one)")
