"""train.py's distillation stage on tiny random checkpoints: the on-policy fraction, each loss lowering
the reverse KL on fresh samples, a teacher equal to the student, seq-KD rows against the teacher's own
samples, bad input and NaN losses, and cross-tokenizer runs against the plain path and the sequence-level
reverse KL."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from conftest import make_ckpt, one_line_error, run, tiny_model
from data.countdown import EOS, PAD, TOKENIZER_PATH, load_split, load_tokenizer, prompt_ids
from losses import per_token_divergence, token_logprobs
from checkpoint import load_pretrained, save_pretrained
from model import GPTConfig
from rollout import generate, left_pad, rollout_seed

FAST = ["--batch-size", "8", "--max-new-tokens", "6", "--eval-n", "8", "--eval-every", "0", "--warmup", "0"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return make_ckpt(d / "teacher", 1, 2, sharpen=20.0), make_ckpt(d / "student", 2, 1)


def run_main(argv):
    train.main(argv)


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


@pytest.mark.parametrize("lmbda", [0.0, 0.25, 0.5, 1.0])
def test_on_policy_fraction_is_exact_and_lambda_zero_never_samples(ckpts, tmp_path, monkeypatch, lmbda):
    teacher, student = ckpts
    sampled = []
    import rollout
    real_sample = rollout.sample
    # training steps only: the held-out reverse-KL eval samples too, at steps -1, -2, ...
    monkeypatch.setattr(rollout, "sample", lambda model, prompts, run, step, stream, *skd: (
        step >= 0 and sampled.append((model, len(prompts)))) or real_sample(model, prompts, run, step, stream, *skd))
    out = str(tmp_path / "run")
    run_main(["--teacher", teacher, "--student", student, "--out", out, "--lmbda", str(lmbda), "--steps", "4", *FAST])
    steps = [r for r in rows(out) if "on_policy_frac" in r]
    assert len(steps) == 4 and all(r["on_policy_frac"] == lmbda for r in steps)
    assert sum(n for _, n in sampled) == round(lmbda * 8) * 4  # exactly lambda of every batch's rows
    if lmbda == 0:
        assert sampled == [] and all(r["student_rkl"] is None for r in steps)


def fresh_rkl(student, teacher, seed, n=128):
    """Per-token reverse KL to the teacher on fresh student samples (full distributions)."""
    tok = load_tokenizer()
    probs = load_split("val")[:n]
    ids, valid = left_pad([prompt_ids(tok, a, b) for a, b, _ in probs], 0)
    b = generate(student, ids, valid, 6, 2, 0, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        s, t = student(b.tokens, b.pos, b.valid)[:, :-1], teacher(b.tokens, b.pos, b.valid)[:, :-1]
    m = b.mask[:, 1:]
    return per_token_divergence(s[m], t[m], "rkl").mean().item()


@pytest.mark.parametrize("loss", ["rkl", "fkl", "jsd", "sampled"])
def test_one_step_lowers_reverse_kl_on_fresh_samples(ckpts, tmp_path, loss):
    teacher, student = ckpts
    out = str(tmp_path / "run")
    run_main(["--teacher", teacher, "--student", student, "--out", out, "--loss", loss, "--steps", "1", "--lr", "1e-2",
              "--weight-decay", "0", *FAST, "--batch-size", "32"])
    t, before = load_pretrained(teacher), load_pretrained(student)
    after = load_pretrained(os.path.join(out, "ckpt", "step_000001"))
    kl0, kl1 = fresh_rkl(before, t, 123), fresh_rkl(after, t, 123)
    assert kl1 < 0.98 * kl0, (kl0, kl1)


@pytest.mark.parametrize("loss", ["rkl", "jsd"])
def test_teacher_equal_to_student_gives_zero_loss_and_no_update(ckpts, tmp_path, loss):
    _, student = ckpts
    out = str(tmp_path / "run")
    run_main(["--teacher", student, "--student", student, "--out", out, "--loss", loss, "--steps", "2",
              "--weight-decay", "0", "--lmbda", "0.5", *FAST])
    assert all(r["loss"] == 0 for r in rows(out) if "loss" in r)
    a, b = weights(student), weights(os.path.join(out, "ckpt", "step_000002"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampled_with_teacher_equal_to_student_has_round_off_advantages(ckpts, tmp_path):
    """p_old is the rollout's logprobs (KV-cached decode), log p_T the teacher's full forward: with the same
    weights the advantages are float round-off (~1e-7), so is the loss, not exactly 0 as with rkl/jsd.
    (Adam would still turn those round-off gradients into an lr-sized step: hence one step here.)"""
    _, student = ckpts
    out = str(tmp_path / "run")
    run_main(["--teacher", student, "--student", student, "--out", out, "--loss", "sampled", "--steps", "1",
              "--weight-decay", "0", *FAST])
    losses = [r["loss"] for r in rows(out) if "loss" in r]
    assert len(losses) == 1 and abs(losses[0]) < 1e-6, losses


def test_seq_kd_rows_are_teacher_samples(ckpts, tmp_path, monkeypatch):
    teacher, student = ckpts
    packed = []
    real_make_batch = train.make_batch
    monkeypatch.setattr(train, "make_batch", lambda step, rows, *a, **kw: (
        lambda b: step == 0 and packed.append(([r.prompt for r in rows], b[0].completions())) or b)(
        real_make_batch(step, rows, *a, **kw)))
    run_main(["--teacher", teacher, "--student", student, "--out", str(tmp_path / "run"), "--lmbda", "0.5",
              "--seq-kd", "--steps", "1", *FAST])
    prompts, comps = packed[0]
    tok = load_tokenizer()
    t_model = load_pretrained(teacher)
    off_p, off_c = prompts[4:], comps[4:]
    ids, valid = left_pad(off_p, tok.token_to_id(PAD))
    g = torch.Generator().manual_seed(rollout_seed(0, 0, 1))
    ref = generate(t_model, ids, valid, 6, tok.token_to_id(EOS), tok.token_to_id(PAD), temperature=1.0, generator=g)
    assert off_c == ref.completions()
    s_ref = generate(load_pretrained(student), ids, valid, 6, 2, 0, temperature=1.0,
                     generator=torch.Generator().manual_seed(rollout_seed(0, 0, 1)))
    assert off_c != s_ref.completions()  # and they are not the student's


def test_bad_input_fails_before_training(ckpts, tmp_path):
    teacher, student = ckpts
    base = ["--teacher", teacher, "--student", student, "--out", str(tmp_path / "run"), *FAST]
    other = tmp_path / "otherteacher"
    make_ckpt(other, 3, 1)
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"[PAD]": 0, "[BOS]": 1, "[EOS]": 2} | {c: i + 3 for i, c in enumerate("0123456789+-*/=,>: x")},
                               unk_token="x")).save(str(other / "tokenizer.json"))
    for args, want in ((["--lmbda", "1.5"], "--lmbda"), (["--loss", "jsd", "--beta", "0"], "--beta"),
                       (["--loss", "kl"], "invalid choice"), (["--teacher", str(tmp_path / "nope")], "does not exist"),
                       (["--teacher", str(other), "--cross-tokenizer", "off"], "tokenizers differ"),
                       (["--teacher", str(other), "--seq-kd"], "--seq-kd with a cross-tokenizer teacher"),
                       (["--max-new-tokens", "60"], "over the student's context"),
                       (["--rollout", "skd", "--skd-top-k", "0"], "--skd-top-k must be >= 1"),
                       (["--rollout", "skd", "--skd-top-k", "24"], "above the vocabulary (23)"),
                       (["--rollout", "skd", "--teacher", str(other)], "--rollout skd needs the teacher's tokenizer"),
                       (["--rollout", "skd", "--loss", "sampled", "--lmbda", "1"], "a full-vocabulary loss")):
        r = run("train.py", *base, *args, check=False)
        assert r.returncode != 0 and want in r.stderr.strip().splitlines()[-1], (args, r.stderr[-500:])
        assert not os.path.exists(os.path.join(tmp_path, "run", "latest"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(ckpts, tmp_path):
    teacher, student = ckpts
    out = str(tmp_path / "run")
    bad = tmp_path / "nanteacher"
    sd, m = weights(teacher), load_pretrained(teacher)
    sd["head.weight"][0, 0] = float("nan")
    save_pretrained(sd, m.cfg, str(bad), TOKENIZER_PATH)
    args = ["--student", student, "--out", out, "--steps", "4", "--save-every", "1", *FAST]
    r = run("train.py", "--teacher", str(bad), *args, check=False)  # no checkpoint yet: none is named
    assert "step 1" in one_line_error(r) and "no checkpoint was saved yet" in r.stderr
    assert not os.path.exists(os.path.join(out, "latest"))
    shutil.rmtree(out)
    run("train.py", "--teacher", teacher, *args, "--max-minutes", "1e-9")  # stops (and saves) after step 1
    r = run("train.py", "--teacher", str(bad), *args, "--resume", check=False)
    assert "step 2" in one_line_error(r) and "step_000001" in r.stderr
    with open(os.path.join(out, "latest")) as f:
        assert f.read() == "step_000001"
    assert all(math.isfinite(v.abs().sum().item()) for v in weights(os.path.join(out, "ckpt", "step_000001")).values())


def test_bad_input_found_by_trying_it_fails_with_one_line_and_writes_nothing(ckpts, tmp_path):
    """A checkpoint without its tokenizer.json (student or teacher: never a borrowed tokenizer), a --resume
    that would change the learning-rate schedule, a reversed or blank --keep-layers, and a --loss-temperature
    that nothing would read."""
    teacher, student = ckpts
    bare = tmp_path / "bare"
    shutil.copytree(student, bare)
    os.remove(bare / "tokenizer.json")
    base = ["--teacher", teacher, "--student", student, *FAST]
    for args, want in ((["--student", str(bare)], "no tokenizer.json"), (["--teacher", str(bare)], "no tokenizer.json"),
                       (["--keep-layers", "::-1"], "--keep-layers '::-1'"), (["--keep-layers", " "], "--keep-layers ' '"),
                       (["--loss", "sampled", "--loss-temperature", "2"], "--loss-temperature"),
                       (["--stage", "rl", "--samples-per-prompt", "2", "--loss-temperature", "2"], "--loss-temperature")):
        out = tmp_path / "new"
        assert want in one_line_error(run("train.py", *base, *args, "--out", str(out), check=False)), args
        assert not os.path.exists(out), args
    out = str(tmp_path / "run")
    run("train.py", *base, "--out", out, "--steps", "2")
    before = sorted(os.listdir(out)), open(os.path.join(out, "metrics.jsonl")).read()
    for change in (["--steps", "4"], ["--warmup", "3"], ["--lr", "1e-3"]):  # the last of a flag wins
        msg = one_line_error(run("train.py", *base, "--out", out, "--steps", "2", "--resume", *change, check=False))
        assert f"trained with {change[0]}" in msg, msg
    assert (sorted(os.listdir(out)), open(os.path.join(out, "metrics.jsonl")).read()) == before


def test_cross_tokenizer_path_with_identical_tokenizers_equals_the_plain_path(ckpts, tmp_path):
    """--cross-tokenizer on with one tokenizer: every span is one token on each side, so the span losses
    and the hybrid (nothing outside the shared vocabulary) must give the plain path's losses and weights."""
    teacher, student = ckpts
    for loss, lmbda in (("rkl", "0.5"), ("sampled", "1")):
        outs = []
        for mode in ("off", "on"):
            out = str(tmp_path / f"{loss}-{mode}")
            run_main(["--teacher", teacher, "--student", student, "--out", out, "--loss", loss, "--steps", "2",
                      "--lmbda", lmbda, "--cross-tokenizer", mode, *FAST])
            outs.append(out)
        a, b = [[r for r in rows(o) if "loss" in r] for o in outs]
        assert all(r["one_to_one_frac"] == 1.0 for r in b)
        for x, y in zip(a, b):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)
        wa, wb = weights(os.path.join(outs[0], "ckpt", "step_000002")), weights(os.path.join(outs[1], "ckpt", "step_000002"))
        assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)


@pytest.mark.parametrize("loss", ["rkl", "sampled"])
def test_cross_tokenizer_distill_lowers_sequence_reverse_kl(ckpts, tmp_path, loss):
    """A number-level student, the char-level teacher: a few steps lower the sequence-level reverse KL,
    sum over the completion of log p_S(x) - log p_T(x), on fresh student samples."""
    from data.countdown import NUM_TOKENIZER_PATH
    from crosstok import cross_tokenizer_batch, span_logprobs
    from losses import token_logprobs
    teacher, _ = ckpts
    n_tok = load_tokenizer(NUM_TOKENIZER_PATH)
    model = tiny_model(5, vocab_size=n_tok.get_vocab_size(), n_layer=1, max_seq_len=GPTConfig.max_seq_len)
    student = str(tmp_path / "numstudent")
    save_pretrained(model.state_dict(), model.cfg, student, NUM_TOKENIZER_PATH)
    out = str(tmp_path / "run")
    run_main(["--teacher", teacher, "--student", student, "--out", out, "--loss", loss, "--steps", "8", "--lr", "3e-2",
              "--weight-decay", "0", "--batch-size", "32", "--max-new-tokens", "6", "--eval-n", "8",
              "--eval-every", "0", "--warmup", "0"])
    assert all(0 < r["one_to_one_frac"] <= 1 for r in rows(out) if "loss" in r)
    t_model, c_tok = load_pretrained(teacher), load_tokenizer()

    def seq_rkl(path):
        model = load_pretrained(path)
        probs = load_split("val")[:128]
        ids, valid = left_pad([prompt_ids(n_tok, a, b) for a, b, _ in probs], 0)
        b = generate(model, ids, valid, 6, 2, 0, temperature=1.0, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            cb = cross_tokenizer_batch(b, probs, n_tok, c_tok)
            s_lp = token_logprobs(model(b.tokens, b.pos, b.valid)[:, :-1], b.tokens[:, 1:])
            t_lp = token_logprobs(t_model(cb.teacher.tokens, cb.teacher.pos, cb.teacher.valid)[:, :-1],
                                  cb.teacher.tokens[:, 1:])
            s, t = span_logprobs(s_lp, t_lp, cb)
        return (s - t).sum().item() / len(probs)

    before, after = seq_rkl(student), seq_rkl(os.path.join(out, "ckpt", "step_000008"))
    assert after < 0.97 * before, (before, after)


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "4"]])
def test_a_hf_student_made_and_saved_by_train_loads_in_transformers(chat_tokenizer_dir, tmp_path, lora):
    """A tiny Llama with a chat template as teacher; the student starts from every other of its layers
    (--keep-layers ::2). Two steps later the saved student is a Hugging Face checkpoint: transformers loads it
    with our logits, its chat files came along, and its weights moved away from the teacher's. With LoRA
    (adapters on the SwiGLU and grouped-query linears) the checkpoint is the merged one and the tied
    embedding did not move."""
    import shutil
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from chat import load_chat
    from conftest import hf_logits, make_hf_model
    from model import keep_layers, positions_from_valid
    teacher = tmp_path / "teacher"
    vocab = load_chat(chat_tokenizer_dir).tok.get_vocab_size()
    make_hf_model(teacher, "llama", tied=True, vocab_size=vocab, n_layer=4, bos_token_id=0, eos_token_id=2)
    for f in os.listdir(chat_tokenizer_dir):
        shutil.copyfile(os.path.join(chat_tokenizer_dir, f), teacher / f)
    out = str(tmp_path / "run")
    run_main(["--teacher", str(teacher), "--student", str(teacher), "--keep-layers", "::2", "--out", out,
              "--steps", "2", "--lr", "1e-3", "--max-new-tokens", "8", *FAST[:2], *FAST[4:], *lora])
    saved = os.path.join(out, "ckpt", "step_000002")
    ours, ref = load_pretrained(saved), AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    assert ours.cfg.n_layer == ref.config.num_hidden_layers == 2 and ours.cfg.arch == "llama"
    ids, valid = left_pad([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]], 0)
    with torch.no_grad():
        diff = (hf_logits(ref, ids, valid) - ours(ids, positions_from_valid(valid), valid))[valid].abs().max()
    assert diff < 1e-5
    start = keep_layers(load_pretrained(str(teacher)), [0, 2])
    assert not torch.equal(start.blocks[1].fc.weight, ours.blocks[1].fc.weight)
    assert torch.equal(start.embed.weight, ours.embed.weight) == bool(lora)
    assert AutoTokenizer.from_pretrained(saved).apply_chat_template([{"role": "user", "content": "hi"}],
                                                                    add_generation_prompt=True, tokenize=False)


def test_val_rkl_is_the_students_reverse_kl_on_its_own_samples(ckpts, tmp_path):
    """The start-of-run val_rkl against an independent computation: the student samples the held-out prompts
    with the eval's seed, both models run a plain full forward, and the per-token KL(p_S || p_T) is averaged
    over the sampled tokens."""
    teacher, student = ckpts
    out = str(tmp_path / "run")
    run_main(["--teacher", teacher, "--student", student, "--out", out, "--steps", "1", *FAST])
    got = rows(out)[0]["student_val_rkl_before"]
    tok, s, t = load_tokenizer(), load_pretrained(student), load_pretrained(teacher)
    ids, valid = left_pad([prompt_ids(tok, a, b) for a, b, _ in load_split("val")[:8]], tok.token_to_id(PAD))
    b = generate(s, ids, valid, 6, tok.token_to_id(EOS), tok.token_to_id(PAD), temperature=1.0,
                 generator=torch.Generator().manual_seed(rollout_seed(0, -1, 0)))
    with torch.no_grad():
        m = b.mask[:, 1:]
        want = per_token_divergence(s(b.tokens, b.pos, b.valid)[:, :-1][m], t(b.tokens, b.pos, b.valid)[:, :-1][m],
                                    "rkl").mean().item()
    assert got == pytest.approx(want, rel=1e-5)


def test_teacher_gap_measures_against_an_independent_computation(ckpts, tmp_path):
    """The start-of-run measures a collapsed student cannot game, recomputed here with plain full forwards in
    float64: forward KL on the teacher's samples (the eval's seed, stream 1), greedy agreement and top-1
    agreement on the teacher's greedy replies (24 tokens: the eval's budget), and distinct-2 of both models'
    samples."""
    teacher, student = ckpts
    out = str(tmp_path / "run")
    run_main(["--teacher", teacher, "--student", student, "--out", out, "--steps", "1", *FAST])
    got = rows(out)[0]
    tok, s, t = load_tokenizer(), load_pretrained(student), load_pretrained(teacher)
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    ids, valid = left_pad([prompt_ids(tok, a, b) for a, b, _ in load_split("val")[:8]], pad)
    sampled = {who: generate(m, ids, valid, 6, eos, pad, temperature=1.0,
                             generator=torch.Generator().manual_seed(rollout_seed(0, -1, stream)))
               for who, m, stream in (("student", s, 0), ("teacher", t, 1))}
    greedy = {who: generate(m, ids, valid, 24, eos, pad, temperature=0.0) for who, m in (("student", s), ("teacher", t))}
    with torch.no_grad():
        b = sampled["teacher"]
        m = b.mask[:, 1:]
        ls, lt = (F.log_softmax(x(b.tokens, b.pos, b.valid)[:, :-1][m].double(), -1) for x in (s, t))
        fkl = (lt.exp() * (lt - ls)).sum(-1).mean().item()
        g = greedy["teacher"]
        m = g.mask[:, 1:]
        top1 = (s(g.tokens, g.pos, g.valid)[:, :-1].argmax(-1) == g.tokens[:, 1:])[m].float().mean().item()
    same = sum(a == b for a, b in zip(greedy["student"].completions(), greedy["teacher"].completions())) / 8

    def distinct2(batch):
        grams = [list(zip(c, c[1:])) for c in batch.completions()]
        return sum(len(set(x)) for x in grams) / sum(len(x) for x in grams)
    assert got["student_val_fkl_before"] == pytest.approx(fkl, rel=1e-5)
    assert got["student_val_top1_agreement_before"] == pytest.approx(top1, abs=1e-9)
    assert got["student_val_greedy_agreement_before"] == pytest.approx(same, abs=1e-9)
    assert got["student_val_distinct2_before"] == pytest.approx(distinct2(sampled["student"]), abs=1e-9)
    assert got["student_val_teacher_distinct2_before"] == pytest.approx(distinct2(sampled["teacher"]), abs=1e-9)
    assert fkl > 0.1  # the pair differs
    same_out = str(tmp_path / "same")  # a student that is its teacher agrees everywhere
    run_main(["--teacher", student, "--student", student, "--out", same_out, "--steps", "1", *FAST])
    first = rows(same_out)[0]
    assert first["student_val_fkl_before"] == 0 and first["student_val_top1_agreement_before"] == 1
    assert first["student_val_greedy_agreement_before"] == 1
    evals = [r for r in rows(out) if "val_fkl" in r]
    assert evals and {"val_rkl", "val_greedy_agreement", "val_top1_agreement", "val_distinct2"} <= set(evals[-1])


def test_collapse_warning_names_the_repetition():
    from eval_countdown import collapse_warning
    assert collapse_warning(dict(distinct2=0.2, teacher_distinct2=0.6), 40).startswith("warning: step 40")
    assert collapse_warning(dict(distinct2=0.4, teacher_distinct2=0.6), 40) is None
    assert collapse_warning(dict(rkl=None), 40) is None  # across tokenizers nothing is measured


def test_sft_seq_kd_trains_on_teacher_samples(ckpts, tmp_path, monkeypatch):
    """--stage sft --seq-kd: every row's completion is the teacher's sample (stream 1 of the step's seed),
    the loss is the student's cross-entropy on it, and the teacher is never asked to score."""
    teacher, student = ckpts
    packed, scored = [], []
    real_make_batch = train.make_batch
    monkeypatch.setattr(train, "make_batch", lambda step, rows, *a, **kw: (
        lambda b: step == 0 and packed.append(([r.prompt for r in rows], b[0])) or b)(
        real_make_batch(step, rows, *a, **kw)))
    monkeypatch.setattr(train, "teacher_scores", lambda *a: scored.append(1))
    out = str(tmp_path / "run")
    run_main(["--stage", "sft", "--seq-kd", "--teacher", teacher, "--student", student, "--out", out, "--steps", "1",
              "--lr", "1e-3", *FAST])
    prompts, batch = packed[0]
    tok = load_tokenizer()
    ids, valid = left_pad(prompts, tok.token_to_id(PAD))
    g = torch.Generator().manual_seed(rollout_seed(0, 0, 1))
    ref = generate(load_pretrained(teacher), ids, valid, 6, tok.token_to_id(EOS), tok.token_to_id(PAD),
                   temperature=1.0, generator=g)
    assert batch.completions() == ref.completions() and not batch.on_policy.any() and scored == []
    s_logits = load_pretrained(student)(batch.tokens, batch.pos, batch.valid)[:, batch.prompt_len - 1:-1]
    ce = -(token_logprobs(s_logits, batch.tokens[:, batch.prompt_len:]) * batch.mask[:, batch.prompt_len:]).sum()
    ce = ce.item() / batch.mask.sum().item()  # the unfused cross-entropy
    logged = [r for r in rows(out) if "loss" in r]
    assert logged[0]["loss"] == pytest.approx(ce, rel=1e-5) and logged[0]["samples"] == 0


def test_speculative_kd_rows_are_the_teacher_corrected_rollouts(ckpts, tmp_path, monkeypatch):
    """--rollout skd: the on-policy rows are rollout.generate's speculative rollouts with the step's seeds, the
    off-policy rows stay ground truth, and the logged acceptance is the share of kept proposals."""
    teacher, student = ckpts
    packed = []
    real_make_batch = train.make_batch
    monkeypatch.setattr(train, "make_batch", lambda step, rows, *a, **kw: (
        lambda b: step == 0 and packed.append(([r.prompt for r in rows], b[0])) or b)(
        real_make_batch(step, rows, *a, **kw)))
    out = str(tmp_path / "run")
    run_main(["--teacher", teacher, "--student", student, "--out", out, "--lmbda", "0.5", "--rollout", "skd",
              "--skd-top-k", "10", "--steps", "1", *FAST])
    prompts, batch = packed[0]
    ids, valid = left_pad(prompts[:4], 0)
    ref = generate(load_pretrained(student), ids, valid, 6, 2, 0, temperature=1.0, teacher=load_pretrained(teacher),
                   skd_top_k=10, generator=torch.Generator().manual_seed(rollout_seed(0, 0, 0)),
                   teacher_generator=torch.Generator().manual_seed(rollout_seed(0, 0, 0) + (1 << 48)))
    assert batch.completions()[:4] == ref.completions()
    assert batch.completion_values(batch.kept)[:4] == ref.completion_values(ref.kept)
    assert not batch.kept[4:].any() and batch.on_policy.tolist() == [True] * 4 + [False] * 4
    m = [r for r in rows(out) if "loss" in r][0]
    assert m["skd_accept"] == pytest.approx(ref.kept.sum().item() / ref.mask.sum().item(), abs=1e-4)
    assert 0 < m["skd_accept"] < 1


@pytest.mark.parametrize("extra", [[], ["--lmbda", "0.5", "--micro-batch-size", "4"]], ids=["l1", "l0.5-micro4"])
def test_speculative_kd_step_reuses_the_teachers_decode_hidden_states(ckpts, tmp_path, monkeypatch, extra):
    """--rollout skd: the step's loss reads the hidden states the teacher computed while decoding
    (Batch.teacher_hidden) instead of scoring the batch again: the same loss, reverse KL and student
    gradients as a step that scores (teacher.score), to fp32 round-off. A micro-batch holding given rows is
    scored whole (here the second of two, at lambda 0.5), and the logged FLOPs leave out exactly the
    teacher forwards that did not run."""
    import teacher as teacher_mod
    from flops import flops_score
    teacher, student = ckpts
    real_score, real_clip, real_make_batch = teacher_mod.score, torch.nn.utils.clip_grad_norm_, train.make_batch

    def one_step(reuse):
        got = dict(scored=[], grads=None, batch=None)
        if not reuse:
            for mod in (teacher_mod, train):
                monkeypatch.setattr(mod, "reuses_rollout", lambda batch: False)
        # step batches (they alone carry the rollout's hidden states) the teacher scores
        monkeypatch.setattr(teacher_mod, "score", lambda t, b, *a, **kw: (
            b.teacher_hidden is not None and got["scored"].append(b.on_policy.tolist())) or real_score(t, b, *a, **kw))
        monkeypatch.setattr(train, "make_batch", lambda step, *a, **kw: (
            lambda b: got.update(batch=b[0]) or b)(real_make_batch(step, *a, **kw)))

        def clip(params, *a, **kw):
            params = list(params)
            got["grads"] = [(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                            for p in params]
            return real_clip(params, *a, **kw)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        out = str(tmp_path / f"reuse{int(reuse)}")
        run_main(["--teacher", teacher, "--student", student, "--out", out, "--rollout", "skd", "--skd-top-k", "3",
                  "--steps", "1", *FAST, *extra])
        monkeypatch.undo()
        return [r for r in rows(out) if "loss" in r][0], got

    (m1, reused), (m0, scored) = one_step(True), one_step(False)
    lmbda = 0.5 if "--lmbda" in extra else 1.0
    assert scored["scored"] == ([[True] * 4, [False] * 4] if lmbda < 1 else [[True] * 8])
    assert reused["scored"] == ([[False] * 4] if lmbda < 1 else [])  # only the micro-batch of given rows
    assert reused["batch"].completions() == scored["batch"].completions()
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-5) and m1["loss"] > 0
    assert m1["student_rkl"] == pytest.approx(m0["student_rkl"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
    for a, b in zip(reused["grads"], scored["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # the FLOPs left out: one scoring forward of the on-policy rows (hidden states, from the last prompt
    # column, each distinct prompt once)
    b = reused["batch"].select(slice(0, 4) if lmbda < 1 else slice(None))
    K = len(torch.unique(b.tokens[:, :b.prompt_len].masked_fill(~b.valid[:, :b.prompt_len], -1), dim=0))
    t_cfg = load_pretrained(teacher).cfg
    skipped = flops_score(t_cfg, len(b.tokens), b.prompt_len, b.tokens.size(1), K, head=False)
    assert m0["flops"] - m1["flops"] == pytest.approx(skipped, rel=1e-9) and skipped > 0
