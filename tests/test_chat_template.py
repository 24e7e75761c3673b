"""Tier 1: ``data.chat_template`` (megatron_rl/data/chat.py) with tokenizers built here, offline.

The tiny char-level tokenizer gets a hand-written template (BOS, role tags, the assistant header)
and is saved and reloaded as the trainer loads it. The prompt's ids must be those of the string
written out by hand below, each character looked up in the vocabulary directly, with the BOS once.
Negative controls: the same tokenizer without a template is refused before any work (one line
naming data.chat_template and the fix), and ``chat_template=false`` leaves the prompt bare.
"""
import pytest
from transformers import AutoTokenizer

from megatron_rl.config import ConfigError, check_files, load_config
from megatron_rl.data import encode_prompt
from megatron_rl.models.tiny import build_tokenizer, tiny_hf_config

pytestmark = pytest.mark.unit
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPT = "47+385="
EXPECTED = "<user>47+385=</user><assistant>"  # after the BOS, written out by hand


def _model_dir(path, *, template):
    path.mkdir()
    tiny_hf_config("llama").save_pretrained(path)
    tok = build_tokenizer()
    if template:
        tok.chat_template = template
    tok.save_pretrained(path)
    return str(path)


def test_prompt_goes_through_the_chat_template(tmp_path):
    path = _model_dir(tmp_path / "chat", template=TEMPLATE)
    tok = AutoTokenizer.from_pretrained(path)  # reloaded from disk, as the trainer does
    ids = encode_prompt(tok, PROMPT, chat_template=True)
    vocab = build_tokenizer().get_vocab()
    assert ids == [vocab["<s>"]] + [vocab[c] for c in EXPECTED], tok.convert_ids_to_tokens(ids)
    assert encode_prompt(tok, PROMPT, chat_template=False) == [vocab[c] for c in PROMPT]  # bare prompt
    cfg = load_config(None, overrides=[f"model.hf_path={path}", "data.chat_template=true"])
    check_files(cfg)  # a tokenizer with a template passes


def test_tokenizer_without_template_is_refused_before_work(tmp_path):
    path = _model_dir(tmp_path / "plain", template=None)
    cfg = load_config(None, overrides=[f"model.hf_path={path}", "data.chat_template=true"])
    with pytest.raises(ConfigError) as e:
        check_files(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config error: data.chat_template:"), msg
    assert "no chat template" in msg and "fix: set data.chat_template=false" in msg, msg
    check_files(load_config(None, overrides=[f"model.hf_path={path}"]))  # the default (false) needs none


def test_shipped_instruct_configs_use_the_chat_template():
    import glob

    for path in glob.glob("configs/*.yaml"):
        cfg = load_config(path)
        assert cfg.data.chat_template == ("Instruct" in cfg.model.hf_path), (path, cfg.model.hf_path)
