"""A checkpoint's text interface: how text becomes ids for this checkpoint.

    chat = load_chat("checkpoints/smollm2")          # a checkpoint directory in the Hugging Face layout
    ids = prompt_ids(chat, [{"role": "user", "content": "Hi"}])

The chat template is Jinja, rendered as transformers renders it (a sandboxed environment with trim_blocks
and lstrip_blocks, `raise_exception`, the bos/eos token strings; tested against apply_chat_template), and
the text is encoded without the tokenizer's own special tokens: templates write theirs. Where each part
comes from, the first source found winning:

    tokenizer  tokenizer.json in the directory, else the default tokenizer (this codebase's tiny checkpoints
               carry none)
    template   chat_template.jinja, else tokenizer_config.json "chat_template" (a string, or a list of
               {"name", "template"}: the "default" one); None: the checkpoint has no chat template
    eos_ids    generation_config.json eos_token_id (an int or a list), else config.json eos_token_id, else
               tokenizer_config.json eos_token, else the [EOS] token. The first is the token an answer ends
               with: the end-of-turn token when the template writes one of them after an assistant message
               (Llama 3 lists <|end_of_text|> before <|eot_id|>)
    pad_id     tokenizer_config.json pad_token, else config.json pad_token_id, else [PAD], else eos_ids[0]
               (any id will do: masks come from lengths, never from the pad id)

Every failure is a ChatError (a ValueError) with one line naming the file.
"""
import json
import os
from dataclasses import dataclass
from functools import lru_cache


class ChatError(ValueError):
    """A tokenizer or chat template that cannot be read or used."""


@dataclass
class Chat:
    tok: object               # tokenizers.Tokenizer
    template: str             # Jinja chat template, or None
    eos_ids: list             # ids that end a completion; eos_ids[0] ends an answer
    pad_id: int
    bos_token: str = None     # special token strings a template may reference
    eos_token: str = None
    path: str = None          # the checkpoint directory (or tokenizer file), for error messages

    def prompt_ids(self, messages):
        return prompt_ids(self, messages)


def _first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _read_json(path):
    """The JSON object in `path`, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatError(f"{path}: cannot read it ({_first_line(e)})")
    if not isinstance(d, dict):
        raise ChatError(f"{path}: not a JSON object")
    return d


def _token_string(value):
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_tokenizer(path):
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ChatError(f"{path}: cannot load the tokenizer ({_first_line(e)})")


def _template(ckpt_dir, tok_cfg):
    jinja = os.path.join(ckpt_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ChatError(f"{jinja}: cannot read it ({_first_line(e)})")
    t = (tok_cfg or {}).get("chat_template")
    where = os.path.join(ckpt_dir, "tokenizer_config.json")
    if isinstance(t, list):  # named templates: the default one serves chat
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        if "default" not in named:
            raise ChatError(f"{where}: chat_template lists no 'default' template (has {sorted(map(str, named))})")
        t = named["default"]
    if t is not None and not isinstance(t, str):
        raise ChatError(f"{where}: chat_template is not a string")
    return t


def _ids(value, tok, where, key):
    """eos_token_id / pad_token_id of a JSON file: an int or a list of ints, each a token of `tok`."""
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        if type(i) is not int or tok.id_to_token(i) is None:
            raise ChatError(f"{where}: {key} {json.dumps(value)} is not a token id of the tokenizer")
    if not ids:
        raise ChatError(f"{where}: {key} is an empty list")
    return ids


def _token_id(name, tok, where, key):
    i = tok.token_to_id(name)
    if i is None:
        raise ChatError(f"{where}: {key} {name!r} is not in the tokenizer's vocabulary")
    return i


def load_chat(ckpt_dir, default_tokenizer=None):
    """The Chat of a checkpoint directory (see the module docstring). ckpt_dir None: the default tokenizer
    alone (a fresh model). When config.json gives vocab_size, the tokenizer must fit it: exactly for this
    codebase's GPT, at most for a Hugging Face model (whose embedding may be padded: Qwen)."""
    ckpt_dir = ckpt_dir or ""
    own = os.path.join(ckpt_dir, "tokenizer.json") if ckpt_dir else None
    if own and os.path.isfile(own):
        tok_path = own
    elif default_tokenizer:
        tok_path = default_tokenizer
    else:
        raise ChatError(f"{ckpt_dir}: no tokenizer.json (and no default tokenizer given)")
    tok = _load_tokenizer(tok_path)
    files = {n: os.path.join(ckpt_dir, n) for n in ("config.json", "generation_config.json", "tokenizer_config.json")}
    cfg, gen, tok_cfg = (_read_json(files[n]) if ckpt_dir else None for n in files)
    cfg, gen, tok_cfg = cfg or {}, gen or {}, tok_cfg or {}

    n, v = tok.get_vocab_size(), cfg.get("vocab_size")
    if isinstance(v, int) and (n > v or ("model_type" not in cfg and n != v)):
        raise ChatError(f"{files['config.json']}: vocab_size {v} does not fit the tokenizer's {n} tokens ({tok_path})")

    eos_token, bos_token = _token_string(tok_cfg.get("eos_token")), _token_string(tok_cfg.get("bos_token"))
    if gen.get("eos_token_id") is not None:
        eos_ids = _ids(gen["eos_token_id"], tok, files["generation_config.json"], "eos_token_id")
    elif cfg.get("eos_token_id") is not None:
        eos_ids = _ids(cfg["eos_token_id"], tok, files["config.json"], "eos_token_id")
    elif eos_token is not None:
        eos_ids = [_token_id(eos_token, tok, files["tokenizer_config.json"], "eos_token")]
    elif tok.token_to_id("[EOS]") is not None:
        eos_ids = [tok.token_to_id("[EOS]")]
    else:
        raise ChatError(f"{ckpt_dir or tok_path}: no end-of-sequence token (generation_config.json or config.json "
                        "eos_token_id, tokenizer_config.json eos_token, or an [EOS] token)")
    eos_ids = list(dict.fromkeys(eos_ids))

    pad_token = _token_string(tok_cfg.get("pad_token"))
    if pad_token is not None:
        pad_id = _token_id(pad_token, tok, files["tokenizer_config.json"], "pad_token")
    elif cfg.get("pad_token_id") is not None:
        pad_id = _ids(cfg["pad_token_id"], tok, files["config.json"], "pad_token_id")[0]
    elif tok.token_to_id("[PAD]") is not None:
        pad_id = tok.token_to_id("[PAD]")
    else:
        pad_id = eos_ids[0]

    template = _template(ckpt_dir, tok_cfg) if ckpt_dir else None
    chat = Chat(tok, template, eos_ids, pad_id, bos_token, eos_token, ckpt_dir or tok_path)
    if template is not None:
        chat.eos_ids = _end_of_turn_first(chat)
    return chat


def _end_of_turn_first(chat):
    """eos_ids with the one the template writes right after an assistant message first, if it writes one."""
    marker = "\x00answer-end\x00"
    try:
        text = render(chat, [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}],
                      add_generation_prompt=False)
    except ChatError:  # a template that renders only what it expects; the prompts decide whether it works
        return chat.eos_ids
    at = text.rfind(marker)
    after = chat.tok.encode(text[at + len(marker):], add_special_tokens=False).ids if at >= 0 else []
    if after and after[0] in chat.eos_ids:
        return [after[0]] + [i for i in chat.eos_ids if i != after[0]]
    return chat.eos_ids


@lru_cache(maxsize=16)
def _compile(template):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    # strftime_now is left undefined on purpose: templates that print today's date (Llama 3) then print
    # their fixed default, so a prompt is the same on every day
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(chat, messages, add_generation_prompt=True):
    """The chat template applied to messages ([{"role", "content"}, ...]), as text."""
    if chat.template is None:
        raise ChatError(f"{chat.path}: the checkpoint has no chat template")
    # a token the tokenizer does not name stays undefined, as in transformers (`bos_token is defined`)
    specials = {k: v for k, v in (("bos_token", chat.bos_token), ("eos_token", chat.eos_token)) if v is not None}
    try:
        return _compile(chat.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **specials)
    except Exception as e:  # a syntax error, raise_exception, an undefined name used wrongly, the sandbox
        raise ChatError(f"{chat.path}: tokenizer cannot render the chat template: {_first_line(e)}")


def prompt_ids(chat, messages):
    """The ids of the rendered conversation, ending with the assistant's generation prompt."""
    return chat.tok.encode(render(chat, messages), add_special_tokens=False).ids
