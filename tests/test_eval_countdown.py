"""eval_countdown.py: --table pools the seeds of an ablation (mean, sample std, share of the teacher, gap
closed) against numbers worked out by hand, --show prints the rollouts and writes the HTML page, and sampled
accuracy and pass@k regroup the samples by problem."""
import json
import os

import pytest
import torch

from conftest import ROOT, make_ckpt, run


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
    with pytest.raises(ValueError, match="not a run directory"):
        eval_countdown.run_table([str(tmp_path / "missing")])


def test_show_prints_rollouts_and_html(ckpts, tmp_path, capsys):
    import eval_countdown
    teacher, student = ckpts
    html = tmp_path / "forks.html"
    assert eval_countdown.main(["--show", student, "--teacher", teacher, "--n", "3", "--html", str(html)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(l.startswith(("ok ", "BAD")) for l in out) == 3
    assert html.read_text().count('<div class="row">') == 3 and "rkl" in html.read_text()  # tests/test_forks.py: the rest


def fake_run(root, name, seed, curve, before=0.2, after=0.4, teacher=None, steps=300):
    """A run directory as train.py writes it: args.json and metrics.jsonl with a step record (loss, FLOPs,
    minutes, samples) and a val record at every eval step of `curve` [(step, val acc, flops)]."""
    d = root / f"{name}-s{seed}"
    d.mkdir()
    (d / "args.json").write_text(json.dumps(dict(seed=seed, steps=steps)))
    recs = [dict(step=0, student_test_accuracy_before=before, val_accuracy=curve[0][1])
            | ({} if teacher is None else dict(teacher_test_accuracy=teacher))]
    for step, acc, flops in curve[1:]:
        recs += [dict(step=step, loss=0.1, flops=flops, minutes=step / 100, samples=step * 8),
                 dict(step=step, val_accuracy=acc)]
    recs.append(dict(step=curve[-1][0], student_test_accuracy_after=after))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(d)


def test_study_table_pools_seeds_and_finds_the_compute_to_reach(tmp_path):
    import eval_countdown
    dirs = [fake_run(tmp_path, "opd", 0, [(0, 0.2, 0), (100, 0.30, 1e12), (200, 0.40, 2e12)], after=0.5, teacher=0.8),
            fake_run(tmp_path, "opd", 1, [(0, 0.2, 0), (100, 0.38, 3e12), (200, 0.50, 4e12)], after=0.6, teacher=0.8),
            fake_run(tmp_path, "sft", 0, [(0, 0.2, 0), (100, 0.25, 5e12), (200, 0.33, 9e12)], after=0.3)]
    table = eval_countdown.study_table(dirs, reach=["sft"])
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in table.splitlines()
            if r.startswith("| opd") or r.startswith("| sft")}
    # opd: mean 55.0 +- 7.1 (sample std of 50, 60), gap (0.55 - 0.2) / (0.8 - 0.2) = +0.58, last point 3 TFLOP
    # mean, 2.0 min, 1600 samples; the sft arm ends at 0.33 val, which opd's mean curve (0.34 at step 100)
    # first reaches at step 100: 2 TFLOP, 1.0 min, 800 samples
    # % of teacher 55 / 80 (the teacher pooled over arms: sft 30 / 80); the last quarter's val gain: mean val 0.45 at the end against 0.34 at step 100 (the
    # last eval at or before 3/4 of 200)
    assert rows["opd"] == ["opd", "0,1", "300", "55.0 +- 7.1", "69%", "+0.58", "+11.0", "3.00", "2.0", "1600",
                           "2.00 / 1.0"]
    assert rows["sft"] == ["sft", "0", "300", "30.0 +- 0.0", "38%", "+0.17", "+8.0", "9.00", "2.0", "1600", "9.00 / 2.0"]
    two = eval_countdown.study_table(dirs, reach=["0.5", "0.2"]).splitlines()
    assert "TFLOP / min to 50.0% | TFLOP / min to 20.0% |" in two[0]
    assert two[2].endswith("| not reached | 0.00 / 0.0 |")  # opd: never 50% on average; 20% at step 0
    with pytest.raises(ValueError, match="neither a fraction nor one of the arms"):
        eval_countdown.study_table(dirs, reach=["rl"])


def test_plot_writes_an_image_and_refuses_runs_without_accuracy(tmp_path):
    import eval_countdown
    pytest.importorskip("matplotlib")  # a test dependency (requirements.txt): CI has it
    dirs = [fake_run(tmp_path, "opd", s, [(0, 0.2, 0), (100, 0.3 + s / 10, 1e12), (200, 0.4, 2e12)], teacher=0.8)
            for s in (0, 1)]
    out = tmp_path / "study.png"
    assert eval_countdown.main(["--plot", *dirs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    empty = tmp_path / "sft-s0"
    empty.mkdir()
    (empty / "args.json").write_text(json.dumps(dict(seed=0, steps=10)))
    (empty / "metrics.jsonl").write_text(json.dumps(dict(step=1, loss=0.3)) + "\n")
    r = run("eval_countdown.py", "--plot", str(empty), "--out", str(tmp_path / "x.png"), check=False)
    assert r.returncode == 2 and "no val accuracy" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    import sys
    import eval_countdown
    d = fake_run(tmp_path, "opd", 0, [(0, 0.2, 0), (100, 0.3, 1e12)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert eval_countdown.main(["--plot", d, "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["eval_countdown.py: error: --plot needs matplotlib (pip install matplotlib)"]


def test_every_rank_decodes_in_as_many_batches():
    """Each decode step is a collective: ranks that ran different numbers of batches would never pair up."""
    from eval_countdown import eval_batch_size
    for world in (1, 2, 3, 4, 8):
        for n in [*range(world, 60), 511, 512, 513, 1023, 1024, 1025, 1026, 1027, 1537, 2902, 5000]:
            size = eval_batch_size(n, world, largest=512)
            counts = {-(-len(range(r, n, world)) // size) for r in range(world)}
            assert len(counts) == 1 and 1 <= size <= 512, (n, world, size, counts)
    assert eval_batch_size(630, 1) == 512  # one process decodes as it always did


def test_sampled_accuracy_and_pass_at_k_count_each_problem_s_samples(capsys):
    """pass@k against the samples regrouped by problem: the same generator drawn in the same order."""
    import eval_countdown
    from data.countdown import load_split
    from eval_countdown import countdown_eval, load_for_eval
    ck = os.path.join(ROOT, "checkpoints", "student")
    assert eval_countdown.main([ck, "--split", "val", "--n", "40", "--sample-temperature", "1", "--samples", "3"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, model, fmt = load_for_eval(ck, None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        countdown_eval(model, fmt, load_split("val")[:40])  # main's greedy pass draws nothing from g
        runs = [[r["correct"] for r in countdown_eval(model, fmt, load_split("val")[:40], temperature=1.0, generator=g)]
                for _ in range(3)]
    assert res["sampled_accuracy"] == pytest.approx(sum(map(sum, runs)) / 120)
    assert res["sampled_pass_at_k"] == pytest.approx(sum(any(col) for col in zip(*runs)) / 40)
    assert res["sampled_accuracy"] <= res["sampled_pass_at_k"] < 1
