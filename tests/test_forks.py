"""forks.py (eval_countdown.py --show --html): the page's top tokens, probabilities and KL at every student
token equal a plain full forward of each model on the same sequence, computed here; the legend's bins
cover the shading; tokens and paths with HTML's special characters come through as text; bad input is
one line."""
from html.parser import HTMLParser

import pytest
import torch

from conftest import tiny_model

# tokens that break a page written without escaping, and whitespace the page must draw
ODD = ["<", "&", '"', "<b>", "&amp;", "\n"]
DRAWN = {"␣": " ", "⏎": "\n"}


class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.kids = tag, dict(attrs), parent, []

    def cls(self):
        return self.attrs.get("class", "").split()

    def text(self, skip=()):
        """Text of the subtree (entities resolved by the parser), without subtrees of classes `skip`."""
        return "".join(k if isinstance(k, str) else "" if set(k.cls()) & set(skip) else k.text(skip)
                       for k in self.kids)

    def find(self, cls=None, tag=None):
        out = []
        for k in self.kids:
            if isinstance(k, Node):
                if (cls is None or cls in k.cls()) and (tag is None or k.tag == tag):
                    out.append(k)
                out += k.find(cls, tag)
        return out


class Tree(HTMLParser):
    VOID = {"meta", "br"}

    def __init__(self, page):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {}, None)
        self.tags = set()
        self.feed(page)
        self.close()
        assert self.cur is self.root, "unclosed elements"

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        node = Node(tag, attrs, self.cur)
        self.cur.kids.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        assert self.cur.tag == tag, f"</{tag}> closes <{self.cur.tag}>"
        self.cur = self.cur.parent

    def handle_data(self, data):
        self.cur.kids.append(data)


@pytest.fixture(scope="module")
def odd_ckpts(tmp_path_factory):
    """A sharp teacher and a random student whose vocabulary is the char one plus ODD, in directories whose
    names need escaping too."""
    from tokenizers import Tokenizer
    from checkpoint import save_pretrained
    from data.countdown import TOKENIZER_PATH
    from model import GPTConfig
    d = tmp_path_factory.mktemp("forks") / 'a&b"<c>'
    d.mkdir()
    tok = Tokenizer.from_file(TOKENIZER_PATH)
    tok.add_tokens(ODD)
    tok.save(str(d / "tokenizer.json"))
    paths = []
    for name, seed, n_layer, sharpen in (("teacher", 1, 2, 20.0), ("student", 2, 2, 1.0)):
        model = tiny_model(seed, vocab_size=tok.get_vocab_size(), n_layer=n_layer, max_seq_len=GPTConfig.max_seq_len)
        with torch.no_grad():
            model.head.weight.mul_(sharpen)
        save_pretrained(model.state_dict(), model.cfg, str(d / name), str(d / "tokenizer.json"))
        paths.append(str(d / name))
    return paths[0], paths[1], tok


def reference_model(path, layers=None):
    """The checkpoint's model, or a fresh one of `layers` blocks with those blocks' weights copied by name."""
    from dataclasses import replace
    from checkpoint import load_pretrained
    from model import GPT
    full = load_pretrained(path)
    if layers is None:
        return full
    ref = GPT(replace(full.cfg, n_layer=len(layers)))
    sd = {k: v for k, v in full.state_dict().items() if not k.startswith("blocks.")}
    for new, old in enumerate(layers):
        sd |= {f"blocks.{new}.{k[len(f'blocks.{old}.'):]}": v for k, v in full.state_dict().items()
               if k.startswith(f"blocks.{old}.")}
    ref.load_state_dict(sd)
    return ref.eval()


def token_id(shown, vocab):
    text = "".join(DRAWN.get(c, c) for c in shown)
    assert text in vocab, f"{shown!r} is no token of the vocabulary"
    return vocab[text]


def close(shown, ref):
    return abs(float(shown) - ref) <= 5e-4 + 0.05 * ref  # printed to 3 decimals, or 2 significant digits


def check_page(page, student, teacher, tok, n, student_layers=None):
    """Every number the page shows against plain full forwards of both models here; returns the parse."""
    from data.countdown import load_split, prompt_text
    tree = Tree(page)
    vocab = tok.get_vocab()
    s_model, t_model = reference_model(student, student_layers), reference_model(teacher)
    rows = tree.root.find(cls="row", tag="div")
    assert len(rows) == n
    legend = tree.root.find(cls="legend")
    assert len(legend) == 1
    bins = {}  # shade class -> [low, high) in nats, read off the legend
    for sw in legend[0].find(tag="span"):
        t = sw.text()
        lo, hi = (float(t[2:]), float("inf")) if t.startswith("≥") else map(float, t.split("–"))
        bins[sw.cls()[0]] = (lo, hi)
    assert sorted(bins.values())[0][0] == 0 and sorted(bins.values())[-1][1] == float("inf")
    for (a, b), (c, _) in zip(sorted(bins.values()), sorted(bins.values())[1:]):
        assert b == c, "the legend's bins leave a gap"
    eos = tok.token_to_id("[EOS]")
    for row, (nums, target, _) in zip(rows, load_split("test")[:n]):
        label = row.find(cls="p")[0]
        assert label.text().split(" ", 1)[1] == prompt_text(nums, target)
        prompt = [tok.token_to_id("[BOS]")] + tok.encode(prompt_text(nums, target)).ids  # the char format's
        assert label.attrs["title"] == tok.decode(prompt, skip_special_tokens=False)
        spans = row.find(cls="t")
        comp = [token_id(s.text(skip=("tip",)), vocab) for s in spans]
        assert 1 <= len(comp) and (comp[-1] == eos or len(comp) == 24) and eos not in comp[:-1]
        seq = torch.tensor([prompt + comp])
        with torch.no_grad():  # plain forwards of one unpadded row
            ls = s_model(seq)[0, len(prompt) - 1:-1].log_softmax(-1).double()
            lt = t_model(seq)[0, len(prompt) - 1:-1].log_softmax(-1).double()
        for c, (span, t) in enumerate(zip(spans, comp)):
            ps, pt = ls[c].exp(), lt[c].exp()
            kl = float((ps * (ls[c] - lt[c])).sum())
            tip = span.find(cls="tip")[0]
            shown_kl = tip.find(cls="kl")[0].text()
            assert abs(float(shown_kl) - kl) <= 5e-4 + 1e-3 * kl, (c, shown_kl, kl)
            lo, hi = bins[[x for x in span.cls() if x in bins][0]]
            assert lo <= kl < hi or min(abs(kl - lo), abs(kl - hi)) < 1e-4  # its shade is its bin's
            this = tip.text(skip=("g",)).split("this token: student ")[1]
            s_this, t_this = this.split(", teacher ")
            assert close(s_this, float(ps[t])) and close(t_this, float(pt[t]))
            cells = tip.find(cls="g")[0].kids[5:]  # past the header row of 5 cells
            assert len(cells) == 5 * 5
            for r in range(5):
                for (tokc, pc), ref in ((cells[5 * r:5 * r + 2], pt), (cells[5 * r + 3:5 * r + 5], ps)):
                    i = token_id(tokc.text(), vocab)
                    assert close(pc.text(), float(ref[i])), (c, r, tokc.text(), pc.text(), float(ref[i]))
                    # rank r holds the r-th largest probability (a swap of near-equal ones aside)
                    assert abs(float(ref[i]) - float(ref.sort(descending=True).values[r])) < 1e-6
                    assert ("me" in tokc.cls()) == (i == t)
    return tree


@pytest.mark.parametrize("keep", [None, "0::2"])
def test_page_shows_each_models_top_tokens_as_a_plain_forward_computes_them(odd_ckpts, tmp_path, capsys, keep):
    import eval_countdown
    teacher, student, tok = odd_ckpts
    page = tmp_path / "forks.html"
    argv = ["--show", student, "--teacher", teacher, "--n", "3", "--html", str(page)]
    assert eval_countdown.main(argv + (["--keep-layers", keep] if keep else [])) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(("ok ", "BAD")) for line in out) == 3 and out[-1] == f"wrote {page}"
    tree = check_page(page.read_text(encoding="utf-8"), student, teacher, tok, 3, [0] if keep else None)
    # escaped, not interpreted: each odd token reads back as itself wherever the page shows one
    shown = {c.text() for c in tree.root.find(tag="code")} | {s.text(skip=("tip",)) for s in tree.root.find(cls="t")}
    assert {"<", "&", '"', "<b>", "&amp;", "⏎", "␣"} <= shown
    assert tree.tags == {"html", "head", "meta", "title", "style", "body", "h1", "p", "div", "span", "code", "i",
                         "b", "u"}  # b: only the grid's empty spacer cells
    assert all(not b.kids for b in tree.root.find(tag="b"))
    title = tree.root.find(tag="p")[0].text()
    assert f"student {student}" in title and f"teacher {teacher}" in title  # the paths hold & " < >
    assert all(s not in page.read_text() for s in ("<script", "<link", "src=", "http"))  # self-contained


def test_visible_draws_whitespace_and_escapes():
    from forks import visible
    space, newline = '<span class="ws">␣</span>', '<span class="ws">⏎</span>'
    assert visible(' <a href="x">&amp;\n') == f"{space}&lt;a{space}href=&quot;x&quot;&gt;&amp;amp;{newline}"
    assert visible("\xa0\u200b") == '<span class="ws">\\xa0</span><span class="ws">\\u200b</span>'
    assert visible("") == '<span class="ws">∅</span>'


def test_page_escapes_a_prompt_and_tokens_written_by_hand():
    from forks import Row, Token, html_page
    prompt = 'say "<b>hi</b>" & go\n'
    top = [(7, '"', 0.5), (8, "<b>", 0.25), (9, "&amp;", 0.125), (10, " ", 0.0625), (11, "x\n", 0.0005)]
    token = Token(8, "<b>", 3.5, p_student=0.25, p_teacher=0.0005, student_top=top[::-1], teacher_top=top)
    row = Row(((1, 2, 3), 6, None), prompt, False, [token])
    tree = Tree(html_page([row], 'title "&<i>"'))
    assert tree.root.find(cls="p")[0].attrs["title"] == prompt
    assert tree.root.find(tag="p")[0].text() == 'title "&<i>"'
    span = tree.root.find(cls="t")[0]
    assert span.text(skip=("tip",)) == "<b>" and "s4" in span.cls()  # 3.5 nats: the last bin, >= 3
    cells = span.find(cls="g")[0].kids[5:]
    assert [c.text() for c in cells[0::5]] == ['"', "<b>", "&amp;", "␣", "x⏎"]  # the teacher's column
    assert [c.text() for c in cells[1::5]] == ["0.500", "0.250", "0.125", "0.062", "5.0e-04"]
    assert [c.text() for c in cells[3::5]] == ["x⏎", "␣", "&amp;", "<b>", '"']  # the student's
    assert [("me" in c.cls()) for c in cells[0::5]] == [False, True, False, False, False]
    assert span.find(cls="tip")[0].text(skip=("g",)) == "rkl 3.500 · this token: student 0.250, teacher 5.0e-04"


@pytest.mark.parametrize("args, message", [
    (["--keep-layers", "0::0"], "--keep-layers '0::0': not a START:STOP:STEP slice"),
    (["--html", "/nonexistent-dir/forks.html"], "--html /nonexistent-dir/forks.html: no such directory"),
])
def test_bad_show_input_is_one_line(odd_ckpts, capsys, args, message):
    import eval_countdown
    teacher, student, _ = odd_ckpts
    assert eval_countdown.main(["--show", student, "--teacher", teacher, "--n", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"eval_countdown.py: error: {message}")


def test_show_only_flags_need_show(capsys):
    import eval_countdown
    with pytest.raises(SystemExit) as e:
        eval_countdown.main(["checkpoints/student", "--keep-layers", "0::2"])
    assert e.value.code == 2 and "--keep-layers go with --show" in capsys.readouterr().err
