"""eval_countdown.py: --table pools the seeds of an ablation (mean, sample std, share of the teacher, gap
closed) against numbers worked out by hand, and --show prints the rollouts and writes the HTML page."""
import json

import pytest

from conftest import make_ckpt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return make_ckpt(d / "teacher", 1, 2, sharpen=20.0), make_ckpt(d / "student", 2, 1)


def test_table_pools_seeds(tmp_path):
    import eval_countdown
    dirs = []
    for seed, acc in ((0, 0.30), (1, 0.40), (2, 0.50)):
        d = tmp_path / f"rkl-l0.5-s{seed}"
        d.mkdir()
        (d / "args.json").write_text(json.dumps(dict(loss="rkl", lmbda=0.5, beta=0.5, steps=100, seed=seed, seq_kd=False)))
        (d / "metrics.jsonl").write_text(
            json.dumps(dict(step=0, teacher_test_accuracy=0.8, student_test_accuracy_before=0.2)) + "\n" +
            json.dumps(dict(step=100, loss=0.1, minutes=2.0)) + "\n" +
            json.dumps(dict(step=100, student_test_accuracy_after=acc)) + "\n")
        dirs.append(str(d))
    table = eval_countdown.run_table(dirs)
    row = [l for l in table.splitlines() if l.startswith("| rkl-l0.5")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    # mean 40.0, sample std 10.0, 50% of the teacher, (0.4 - 0.2) / (0.8 - 0.2) = 0.33 of the gap
    assert cells[1:] == ["-", "0.5", "rkl", "-", "0,1,2", "100", "20.0", "40.0 +- 10.0", "50%", "+0.33", "2.0"]
    with pytest.raises(ValueError, match="not a finished run"):
        eval_countdown.run_table([str(tmp_path / "missing")])


def test_show_prints_rollouts_and_html(ckpts, tmp_path, capsys):
    import eval_countdown
    teacher, student = ckpts
    html = tmp_path / "forks.html"
    assert eval_countdown.main(["--show", student, "--teacher", teacher, "--n", "3", "--html", str(html)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(l.startswith(("ok ", "BAD")) for l in out) == 3
    assert html.read_text().count("<div>") == 3 and "rkl" in html.read_text()
