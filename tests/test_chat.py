"""chat.py and the Countdown formats: prompt ids rendered from a checkpoint's chat template equal transformers'
apply_chat_template (a small byte-level BPE tokenizer written by transformers' save_pretrained, in both
template layouts, and SmolLM2's real template); eos and pad ids from the files that name them; one-line
errors; the char format bit for bit; the chat format's prompts, answers and verifier on the test split;
rollouts that stop at any of several eos ids; and train.py / eval_countdown.py on a chat checkpoint."""
import json
import os
import shutil

import pytest
import torch

import data.countdown as cd
from chat import Chat, ChatError, load_chat, prompt_ids, render
from conftest import CHATML, SPECIALS, make_ckpt, one_line_error, random_prompts, run, tiny_model
from data.countdown import (CharFormat, ChatFormat, NUM_TOKENIZER_PATH, chat_prompt_text, countdown_format,
                            format_expression_answer, load_split, load_tokenizer, steps_to_expression)
from rollout import generate, left_pad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = [
    [{"role": "user", "content": chat_prompt_text((3, 7, 13), 88)}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 7*13?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! "},
     {"role": "user", "content": "  Zahl \u00fc \u2014 7\u00d73 \u2192 21\n"}],
]


@pytest.fixture(scope="module")
def hf_dirs(chat_tokenizer_dir, tmp_path_factory):
    """{layout: directory}: transformers' save_pretrained output (the template in chat_template.jinja), the
    older layout (in tokenizer_config.json) and a list of named templates, made from it by hand."""
    base = tmp_path_factory.mktemp("hf")
    jinja = base / "jinja"
    shutil.copytree(chat_tokenizer_dir, jinja)
    assert (jinja / "chat_template.jinja").read_text() == CHATML  # what transformers 5 writes
    assert "chat_template" not in json.loads((jinja / "tokenizer_config.json").read_text())
    dirs = {"jinja": str(jinja)}
    for layout, value in (("config", CHATML), ("named", [{"name": "tool_use", "template": "{{ 1 }}"},
                                                         {"name": "default", "template": CHATML}])):
        d = base / layout
        shutil.copytree(jinja, d)
        (d / "chat_template.jinja").unlink()
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": value}))
        dirs[layout] = str(d)
    return dirs


def hf_ids(d, messages, add_generation_prompt=True):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(d).apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)


def variant(tmp_path, src, name="ckpt", **json_files):
    """A copy of checkpoint directory `src` with some JSON files replaced (None: removed, str: raw text)."""
    d = tmp_path / name
    shutil.copytree(src, d)
    for fname, obj in json_files.items():
        p = d / (fname.replace("__", ".") if "__" in fname else fname + ".json")
        if obj is None:
            p.unlink(missing_ok=True)
        else:
            p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(d)

# ---------------------------------------------------------------------------------------- against transformers

@pytest.mark.parametrize("layout", ["jinja", "config", "named"])
def test_prompt_ids_match_transformers_apply_chat_template(hf_dirs, layout):
    chat = load_chat(hf_dirs[layout])
    assert chat.template == CHATML
    for messages in MESSAGES:
        assert prompt_ids(chat, messages) == hf_ids(hf_dirs[layout], messages)
        assert chat.prompt_ids(messages) == prompt_ids(chat, messages)
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(hf_dirs[layout])
    for messages in MESSAGES:  # the text too, with and without the generation prompt
        for gen in (True, False):
            assert render(chat, messages, gen) == ref.apply_chat_template(messages, add_generation_prompt=gen,
                                                                          tokenize=False)


def test_special_ids_from_tokenizer_config(hf_dirs):
    chat = load_chat(hf_dirs["jinja"])
    tok = chat.tok
    assert chat.eos_ids == [tok.token_to_id("<|im_end|>")] and chat.pad_id == tok.token_to_id("<|endoftext|>")
    assert (chat.bos_token, chat.eos_token) == ("<|endoftext|>", "<|im_end|>")


def test_eos_ids_from_generation_config_then_config_then_tokenizer_config(hf_dirs, tmp_path):
    tok = load_chat(hf_dirs["jinja"]).tok
    end, im_start, im_end = (tok.token_to_id(t) for t in SPECIALS)
    # generation_config.json wins; the token the template ends an assistant turn with comes first
    d = variant(tmp_path, hf_dirs["jinja"], "gen", generation_config={"eos_token_id": [end, im_end]},
                config={"eos_token_id": im_start, "pad_token_id": im_start})
    assert load_chat(d).eos_ids == [im_end, end]
    d = variant(tmp_path, hf_dirs["jinja"], "gen_int", generation_config={"eos_token_id": end})
    assert load_chat(d).eos_ids == [end]
    d = variant(tmp_path, hf_dirs["jinja"], "cfg", config={"eos_token_id": im_start, "pad_token_id": end})
    assert load_chat(d).eos_ids == [im_start]
    # tokenizer_config.json's eos_token as an AddedToken dict; pad from config.json when it names none
    cfg = json.loads(open(os.path.join(hf_dirs["jinja"], "tokenizer_config.json")).read())
    cfg = {k: v for k, v in cfg.items() if k != "pad_token"} | {"eos_token": {"content": "<|im_end|>"}}
    d = variant(tmp_path, hf_dirs["jinja"], "dict", tokenizer_config=cfg, config={"pad_token_id": im_start})
    chat = load_chat(d)
    assert chat.eos_ids == [im_end] and chat.pad_id == im_start and chat.eos_token == "<|im_end|>"
    d = variant(tmp_path, hf_dirs["jinja"], "nopad", tokenizer_config=cfg)
    assert load_chat(d).pad_id == im_end  # no pad anywhere: eos_ids[0]


def test_smollm2_template_matches_transformers(smollm2_dir):
    chat = load_chat(smollm2_dir)
    assert chat.eos_ids == [2] and chat.pad_id == 2
    for messages in MESSAGES:
        assert prompt_ids(chat, messages) == hf_ids(smollm2_dir, messages)
    fmt = countdown_format(chat)
    assert isinstance(fmt, ChatFormat)
    nums, target, sol = load_split("test")[0]
    assert fmt.prompt_ids(nums, target) == hf_ids(smollm2_dir, [{"role": "user",
                                                                 "content": chat_prompt_text(nums, target)}])

# --------------------------------------------------------------------------------------------------- errors

def check_one_line(e, *words):
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_load_chat_errors_are_one_line_and_name_the_file(hf_dirs, tmp_path):
    src = hf_dirs["jinja"]
    tok = load_chat(src).tok
    cases = [
        (dict(tokenizer=None), ["no tokenizer.json"]),
        (dict(tokenizer="{not json"), ["tokenizer.json", "cannot load"]),
        (dict(tokenizer_config="{not json"), ["tokenizer_config.json", "cannot read"]),
        (dict(tokenizer_config="[1, 2]"), ["tokenizer_config.json", "not a JSON object"]),
        (dict(generation_config='{"eos_token_id": '), ["generation_config.json"]),
        (dict(generation_config={"eos_token_id": 10 ** 6}), ["generation_config.json", "eos_token_id"]),
        (dict(generation_config={"eos_token_id": []}), ["generation_config.json", "eos_token_id"]),
        (dict(config={"eos_token_id": "2"}), ["config.json", "eos_token_id"]),
        (dict(tokenizer_config={"eos_token": "<|nope|>"}), ["tokenizer_config.json", "<|nope|>", "vocabulary"]),
        (dict(tokenizer_config={"eos_token": "<|im_end|>", "pad_token": "<|pad|>"}), ["tokenizer_config.json",
                                                                                      "pad_token"]),
        (dict(tokenizer_config={"eos_token": "<|im_end|>", "chat_template": [{"name": "rag", "template": "x"}]},
              chat_template__jinja=None), ["tokenizer_config.json", "default"]),
        (dict(tokenizer_config={"eos_token": "<|im_end|>", "chat_template": 3}, chat_template__jinja=None),
         ["tokenizer_config.json", "chat_template"]),
        (dict(chat_template__jinja="\udcff"), None),  # not valid UTF-8 on disk: written below
        (dict(config={"vocab_size": tok.get_vocab_size() + 1}), ["config.json", "vocab"]),  # this codebase's GPT
        (dict(config={"model_type": "qwen2", "vocab_size": tok.get_vocab_size() - 1}), ["config.json", "vocab"]),
    ]
    for i, (files, words) in enumerate(cases):
        if words is None:
            d = variant(tmp_path, src, f"c{i}")
            with open(os.path.join(d, "chat_template.jinja"), "wb") as f:
                f.write(b"\xff\xfe{{ x }}")
            words = ["chat_template.jinja", "cannot read"]
        else:
            d = variant(tmp_path, src, f"c{i}", **files)
        with pytest.raises(ChatError) as e:
            load_chat(d)
        check_one_line(e, *words)
    # a Hugging Face model's embedding may be padded past its tokenizer
    d = variant(tmp_path, src, "padded", config={"model_type": "qwen2", "vocab_size": tok.get_vocab_size() + 64})
    assert load_chat(d).tok.get_vocab_size() == tok.get_vocab_size()
    with pytest.raises(ChatError) as e:  # a tokenizer without [EOS] and no file naming an eos
        load_chat(variant(tmp_path, src, "noeos", tokenizer_config={}))
    check_one_line(e, "no end-of-sequence token")


@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}{{ m['content'] }", ["cannot render the chat template"]),           # does not compile
    ("{{ raise_exception('system messages are not supported') }}", ["system messages are not supported"]),
    ("{{ messages[0]['content'].__class__.__mro__ }}", ["cannot render", "unsafe"]),             # the sandbox
    ("{{ undefined_thing.attr }}", ["cannot render", "undefined_thing"]),
])
def test_templates_that_cannot_render_give_one_line(hf_dirs, tmp_path, template, words):
    d = variant(tmp_path, hf_dirs["jinja"], chat_template__jinja=template)
    chat = load_chat(d)  # loading reads the files; rendering is where a template fails
    for call in (lambda: prompt_ids(chat, MESSAGES[0]), lambda: countdown_format(chat)):
        with pytest.raises(ChatError) as e:
            call()
        check_one_line(e, d, *words)


def test_raise_exception_in_a_working_template(hf_dirs):
    chat = load_chat(hf_dirs["jinja"])
    with pytest.raises(ChatError) as e:
        prompt_ids(chat, [{"role": "tool", "content": "{}"}])
    check_one_line(e, hf_dirs["jinja"], "unknown role tool")


def test_render_without_template_is_an_error():
    chat = load_chat(os.path.join(ROOT, "checkpoints", "student"))
    assert chat.template is None
    with pytest.raises(ChatError) as e:
        render(chat, MESSAGES[0])
    check_one_line(e, "no chat template")

# ------------------------------------------------------------------------------------------ Countdown formats

@pytest.mark.parametrize("ckpt, tok_path", [("student", cd.TOKENIZER_PATH), ("student-num", NUM_TOKENIZER_PATH)])
def test_char_format_is_todays_ids_bit_for_bit(ckpt, tok_path):
    chat = load_chat(os.path.join(ROOT, "checkpoints", ckpt))
    tok = load_tokenizer(tok_path)
    assert chat.tok.get_vocab() == tok.get_vocab() and chat.eos_ids == [tok.token_to_id(cd.EOS)]
    assert chat.pad_id == tok.token_to_id(cd.PAD)
    fmt = countdown_format(chat)
    assert isinstance(fmt, CharFormat)
    assert fmt.eos_ids == [tok.token_to_id(cd.EOS)] and fmt.pad_id == tok.token_to_id(cd.PAD)
    problems = load_split("test")
    assert fmt.prompts(problems) == [cd.prompt_ids(tok, n, t) for n, t, _ in problems]
    for n, t, a in problems:
        assert fmt.prompt_ids(n, t) == cd.prompt_ids(tok, n, t)
        assert fmt.answer_ids(a) == cd.answer_ids(tok, a)
        assert fmt.decode(fmt.answer_ids(a)) == a
        assert fmt.verify(n, t, a) and fmt.well_formed(a)
    for text in ("", "1+2=3", "7*13=91,91-3=88", "7*13=91,91-3=87", "x" * 300):
        assert fmt.verify((3, 7, 13), 88, text) == cd.verify((3, 7, 13), 88, text)
        assert fmt.well_formed(text) == cd.is_well_formed(text)


def test_default_tokenizer_serves_a_checkpoint_without_one(tmp_path):
    d = make_ckpt(tmp_path / "old", 0, 1)
    os.remove(os.path.join(d, "tokenizer.json"))
    with pytest.raises(ChatError):
        load_chat(d)
    chat = load_chat(d, cd.TOKENIZER_PATH)
    assert isinstance(countdown_format(chat), CharFormat)
    assert isinstance(countdown_format(load_chat(None, cd.TOKENIZER_PATH)), CharFormat)  # a fresh model


def test_char_format_needs_bos_and_eos(hf_dirs, tmp_path):
    d = variant(tmp_path, hf_dirs["jinja"], chat_template__jinja=None)
    chat = load_chat(d)
    assert chat.template is None
    with pytest.raises(ValueError) as e:
        countdown_format(chat)
    check_one_line(e, "no chat template", "[BOS]")


def test_chat_format_on_the_test_split(hf_dirs):
    chat = load_chat(hf_dirs["jinja"])
    fmt = countdown_format(chat)
    assert isinstance(fmt, ChatFormat)
    end = chat.tok.token_to_id("<|im_end|>")
    assert fmt.eos_ids == [end] and fmt.pad_id == chat.pad_id
    problems = load_split("test")
    prompts = fmt.prompts(problems)
    for (n, t, a), p in zip(problems, prompts):
        assert p == fmt.prompt_ids(n, t) == prompt_ids(chat, [{"role": "user", "content": chat_prompt_text(n, t)}])
        assert chat_prompt_text(n, t) in fmt.decode(p) and fmt.decode(p).endswith("<|im_start|>assistant\n")
        ans = fmt.answer_ids(a)
        expr = steps_to_expression(a)
        assert ans[-1] == end and end not in ans[:-1]
        assert fmt.decode(ans) == f"<answer>{expr}</answer><|im_end|>"
        text = fmt.decode(ans[:-1])
        assert fmt.verify(n, t, text) and fmt.well_formed(text)
        assert not fmt.verify(n, t + 1, text) and not fmt.verify(n, t, a)  # a step list is not an <answer>
    assert not fmt.well_formed("(7*13)-3") and fmt.well_formed("<answer>nonsense</answer>")
    assert fmt.verify((3, 7, 13), 88, "Let me think.\n<answer> (7*13)-3 </answer>")

# ---------------------------------------------------------------------------------------------- rollouts

def test_generate_stops_at_any_of_several_eos_ids():
    model = tiny_model(1).eval()
    ids, valid = left_pad(random_prompts(4), 0)
    N = 12

    def sample(eos):
        return generate(model, ids, valid, N, eos, 0, temperature=1.0, generator=torch.Generator().manual_seed(5))

    free = sample(-1)  # no eos: every row runs N tokens, the noise per step is the same in every call
    comps = free.completions()
    eos = [comps[0][2], comps[1][4]]
    b = sample(eos)
    for row, full in zip(b.completions(), comps):
        stop = next((k for k, x in enumerate(full) if x in eos), None)
        assert row == (full if stop is None else full[:stop + 1])
    P = b.prompt_len
    for i, row in enumerate(b.completions()):  # the mask runs through the first eos and no further
        assert b.mask[i, P:].tolist() == [True] * len(row) + [False] * (b.tokens.size(1) - P - len(row))
        assert torch.equal(b.valid[i, P:], b.mask[i, P:])
    # a one-id list is the int path, bit for bit
    one, one_list = sample(eos[0]), sample([eos[0]])
    for f in ("tokens", "valid", "mask", "logprobs"):
        assert torch.equal(getattr(one, f), getattr(one_list, f))


def test_cross_tokenizer_batch_takes_the_teachers_format():
    from crosstok import cross_tokenizer_batch
    char, num = load_tokenizer(), load_tokenizer(NUM_TOKENIZER_PATH)
    student = tiny_model(2, vocab_size=num.get_vocab_size())
    probs = load_split("val")[:4]
    ids, valid = left_pad([cd.prompt_ids(num, n, t) for n, t, _ in probs], 0)
    b = generate(student, ids, valid, 6, num.token_to_id(cd.EOS), 0, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    try:
        ref = cross_tokenizer_batch(b, probs, num, char)
    except ValueError:  # a random student's text the char teacher cannot reproduce: not this test's concern
        pytest.skip("random completion not representable")
    cb = cross_tokenizer_batch(b, probs, num, char, t_format=CharFormat(char))
    assert torch.equal(cb.teacher.tokens, ref.teacher.tokens) and torch.equal(cb.t_span, ref.t_span)

# ------------------------------------------------------------------------------- training and eval end to end

def chat_ckpt(path, tok_dir, seed, n_layer, sharpen=1.0):
    """A tiny random GPT over the BPE tokenizer, with its chat files: a chat-format checkpoint."""
    from checkpoint import save_pretrained
    n = load_chat(tok_dir).tok.get_vocab_size()
    model = tiny_model(seed, vocab_size=n, n_layer=n_layer, max_seq_len=256)
    with torch.no_grad():
        model.head.weight.mul_(sharpen)
    save_pretrained(model.state_dict(), model.cfg, str(path))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(os.path.join(tok_dir, f), os.path.join(path, f))
    return str(path)


@pytest.fixture(scope="module")
def chat_ckpts(hf_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("chatckpts")
    return chat_ckpt(d / "teacher", hf_dirs["jinja"], 1, 2, sharpen=5.0), chat_ckpt(d / "student", hf_dirs["jinja"], 2, 1)


def test_train_distill_and_sft_on_a_chat_checkpoint(chat_ckpts, tmp_path, monkeypatch):
    import train
    teacher, student = chat_ckpts
    fast = ["--batch-size", "4", "--max-new-tokens", "6", "--eval-n", "4", "--eval-every", "0", "--warmup", "0"]
    packed = []
    import rollout
    real_pack = rollout.pack
    monkeypatch.setattr(rollout, "pack", lambda p, c, *a, **k: packed.append((p, c)) or real_pack(p, c, *a, **k))
    out = str(tmp_path / "distill")
    train.main(["--teacher", teacher, "--student", student, "--out", out, "--steps", "2", "--lmbda", "0.5", *fast])
    chat = load_chat(student)
    fmt = countdown_format(chat)
    problems = train.step_rows(load_split("train"), 0, train.parse_args(["--out", out, *fast, "--lmbda", "0.5"]),
                               2, fmt, 0, 1)
    want = [fmt.prompt_ids(n, t) for n, t, _ in (r.problem for r in problems)]
    assert [r.prompt for r in problems] == want
    step0 = [c for p, c in packed if p == want]  # the first training step's batch (the start-of-run eval packs too)
    assert step0
    comps = step0[0]
    assert comps[2:] == [fmt.answer_ids(r.problem[2]) for r in problems[2:]]  # off-policy: <answer> + <|im_end|>
    saved = os.path.join(out, "ckpt", "step_000002")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # the chat files travel along
        assert os.path.isfile(os.path.join(saved, f)), f
    assert load_chat(saved).template == CHATML
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert any("teacher_test_accuracy" in r for r in recs) and any("val_format_valid" in r for r in recs)
    sft = str(tmp_path / "sft")
    train.main(["--stage", "sft", "--student", student, "--out", sft, "--steps", "1", *fast])
    assert os.path.isfile(os.path.join(sft, "ckpt", "step_000001", "chat_template.jinja"))


def test_eval_countdown_on_a_chat_checkpoint(chat_ckpts, tmp_path, capsys):
    import eval_countdown
    teacher, student = chat_ckpts
    assert eval_countdown.main([student, "--n", "3", "--max-new-tokens", "5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 3 and 0 <= result["greedy_mean_tokens"] <= 5
    assert torch.is_grad_enabled()  # main ran in-process: it leaves grad mode as it found it
    html = tmp_path / "forks.html"
    assert eval_countdown.main(["--show", student, "--teacher", teacher, "--n", "2", "--max-new-tokens", "5",
                                "--html", str(html)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(l.startswith(("ok ", "BAD")) for l in out) == 2 and html.read_text().count("<div class=\"row\">") == 2


def test_a_chat_checkpoint_whose_template_fails_stops_before_training(chat_ckpts, tmp_path):
    _, student = chat_ckpts
    bad = tmp_path / "bad"
    shutil.copytree(student, bad)
    (bad / "chat_template.jinja").write_text("{{ raise_exception('no Countdown here') }}")
    for args in (["--stage", "sft", "--student", str(bad)], ["--student", str(bad), "--teacher", str(bad)]):
        line = one_line_error(run("train.py", *args, "--out", str(tmp_path / "run"), "--steps", "1", check=False))
        assert "cannot render the chat template" in line and "no Countdown here" in line
        assert not os.path.exists(tmp_path / "run" / "latest")
    line = one_line_error(run("eval_countdown.py", str(bad), "--n", "2", check=False))
    assert "no Countdown here" in line
