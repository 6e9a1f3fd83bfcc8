"""The figures: each is a readable PNG of the expected size whose pixels show something (not a blank canvas)."""

import numpy as np
import pytest
from matplotlib.colors import to_hex
from PIL import Image

from ofsdpo import plotting

REPORT = {"method": "cofs-dpo", "domains": ["pos", "safe", "short"],
          "stages": [{"stage": 1, "domain": "pos"}, {"stage": 2, "domain": "safe"}, {"stage": 3, "domain": "short"}],
          "matrix": {"accuracy": [[0.9, 0.4, 0.5], [0.8, 0.95, 0.45], [0.75, 0.9, 1.0]]}}


def read_png(path, size_px):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size_px
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert path.stat().st_size > 10_000
    return pixels


def test_plot_heatmap_writes_the_accuracy_matrix(tmp_path):
    path = tmp_path / "heatmap.png"
    plotting.plot_heatmap(REPORT, path)
    # figsize (1.6 + 1.3 x 3 domains, 1.2 + 0.8 x 3 stages) inches at 100 dpi
    pixels = read_png(path, (550, 360))
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 50  # cells, text, colour bar: not a blank canvas
    # the picture is the matrix: other values, another picture
    other = dict(REPORT, matrix={"accuracy": [[0.0, 1.0, 0.5]] * 3})
    plotting.plot_heatmap(other, tmp_path / "other.png")
    assert not np.array_equal(pixels, read_png(tmp_path / "other.png", (550, 360)))


@pytest.mark.parametrize("over_seeds", [False, True])
def test_judge_matrices_and_curves(tmp_path, over_seeds):
    def cell(v):
        return {"mean": v, "std": 0.1, "n": 3, "values": [v - 0.1, v, v + 0.1]} if over_seeds else v

    matrices = {name: [[cell(0.2 * i - 0.3 * j) for j in range(2)] for i in range(2)] for name in ("a", "b")}
    path = plotting.plot_judge_matrices(matrices, ["x", "y"], tmp_path / "m.png", height=3.6, title="t")
    read_png(tmp_path / "m.png", (680, 360))  # (0.6 + 3.1 x 2 panels, 3.6) inches at 100 dpi
    assert path == str(tmp_path / "m.png")
    curves = {name: [cell(1.0 - 0.1 * s) for s in range(5)] for name in ("a", "b")}
    plotting.plot_curves(curves, tmp_path / "c.png", "step", "loss", figsize=(7, 3.6))
    read_png(tmp_path / "c.png", (700, 360))


def test_judge_heatmaps_have_a_base_row_and_one_colour_bar():
    """The untrained base's scores are the first row of every panel, set apart; one colour bar spans the panels."""
    matrices = {"dpo": [[0.5, -0.2], [0.1, 0.7]], "ofs-dpo": [[0.4, 0.0], [0.2, 0.6]]}
    fig = plotting.draw_judge_matrices(matrices, ["x", "y"], base={"x": -0.25, "y": 0.125})
    panels, bars = fig.axes[:2], fig.axes[2:]
    assert len(bars) == 1 and bars[0].get_ylabel() == "judge score (−1 … 1)"
    assert [t.get_text() for t in panels[0].get_yticklabels()] == [plotting.BASE_ROW, "after x", "after y"]
    for ax, matrix in zip(panels, matrices.values()):
        assert ax.images[0].get_array().tolist() == [[-0.25, 0.125], *matrix]
        assert [t.get_text() for t in ax.texts][:2] == ["-0.25", "+0.12"]  # the base row's cells, written
    plotting.pyplot().close(fig)
    # without a base: the stages alone
    fig = plotting.draw_judge_matrices(matrices, ["x", "y"])
    assert fig.axes[0].images[0].get_array().tolist() == matrices["dpo"]
    plotting.pyplot().close(fig)


def test_judge_heatmaps_wrap_at_three_panels_a_row():
    """Five runs: two rows of three panels (the sixth blank), each row's first panel labelled with the stages, one
    colour bar; side by side the figure would be 16 inches wide and unreadable at the page's width."""
    matrices = {name: [[0.1 * k, -0.1 * k], [0.2 * k, 0.0]] for k, name in enumerate("abcde")}
    fig = plotting.draw_judge_matrices(matrices, ["x", "y"], base={"x": 0.0, "y": 0.0})
    assert tuple(fig.get_size_inches()) == pytest.approx((0.6 + 3.1 * 3, 2 * (1.5 + 0.55 * 3)))
    panels, bar = fig.axes[:6], fig.axes[6:]
    assert len(bar) == 1 and [ax.get_title() for ax in panels] == [*"abcde", ""]
    assert not panels[5].axison and all(ax.axison for ax in panels[:5])
    for k, ax in enumerate(panels[:5]):
        assert ax.images[0].get_array().tolist() == [[0.0, 0.0], *matrices["abcde"[k]]]
        labelled = [t.get_text() for t in ax.get_yticklabels()] == [plotting.BASE_ROW, "after x", "after y"]
        assert labelled == (k in (0, 3))
    plotting.pyplot().close(fig)


def test_stage_curves_integer_steps_boundaries_and_shared_stages():
    """Three stages of 4 steps: boundaries after steps 4 and 8, each stage named over its span; b and c are one
    training in stage 1 (identical values) and part after it; a shares nothing, and d is a at every stage (drawn
    once, as "a = d"); each run's line breaks at the boundaries."""
    a = [[0.7, 0.6, 0.5, 0.4], [0.7, 0.6, 0.5, 0.5], [0.6, 0.5, 0.4, 0.3]]
    b = [[0.69, 0.6, 0.55, 0.5], [0.6, 0.5, 0.4, 0.4], [0.5, 0.4, 0.4, 0.3]]
    c = [b[0], [0.6, 0.55, 0.5, 0.4], b[2]]
    curves = {"a": a, "b": b, "c": c, "d": [list(stage) for stage in a]}
    assert plotting.shared_stages(curves) == [[["a", "d"], ["b", "c"]], [["a", "d"]], [["a", "d"]]]
    assert list(plotting.merge_identical(curves)) == ["a = d", "b", "c"]
    fig = plotting.draw_stage_curves(curves, ["pos", "safe", "short"], "loss, nats")
    ax = fig.axes[0]
    fig.canvas.draw()
    assert [line.get_xdata()[0] for line in ax.lines if line.get_gid() == "stage boundary"] == [4.5, 8.5]
    for name in ("a = d", "b", "c"):
        segments = [list(line.get_xdata()) for line in ax.lines if line.get_gid() == name]
        assert segments == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]  # one line a stage: no line across
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 12]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert [t.get_text() for t in ax.texts] == ["1. pos", "2. safe", "3. short"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a = d", "b", "c"]
    caption, = fig.findobj(lambda artist: artist.get_gid() == "shared stages")
    assert caption.get_text() == "shaded, one training shared by runs — stage 1 (pos): b = c"
    assert len([p for p in ax.patches if p.get_gid() == "shared stage"]) == 1
    assert ax.get_xlabel() == "optimiser step" and ax.get_ylabel() == "loss, nats"
    # colour-blind-safe colours, one per run, in the Okabe–Ito order
    firsts = [next(line for line in ax.lines if line.get_gid() == name) for name in ("a = d", "b", "c")]
    assert [to_hex(line.get_color()).upper() for line in firsts] == list(plotting.OKABE_ITO[:3])
    plotting.pyplot().close(fig)


def test_frontier_draws_each_module_through_its_checkpoints():
    base = {"step": 0, "kl": 0.0, "judge_score": 0.1}
    curves = {"dpo": [base, {"step": 4, "kl": 1.5, "judge_score": 0.4}],
              "ofs-dpo (slow)": [base, {"step": 4, "kl": 0.5, "judge_score": 0.3}]}
    fig = plotting.draw_frontier(curves)
    ax = fig.axes[0]
    assert [list(zip(line.get_xdata(), line.get_ydata())) for line in ax.lines] == [
        [(0.0, 0.1), (1.5, 0.4)], [(0.0, 0.1), (0.5, 0.3)]]
    # the shared base labelled once; each curve's labels on its own side of its points
    assert [t.get_text() for t in ax.texts] == ["0", "4", "4"] and ax.get_xlim()[0] == 0
    assert len({text.xyann for text in ax.texts[1:]}) == 2
    assert "nats" in ax.get_xlabel()
    plotting.pyplot().close(fig)
