"""The figures: each is a readable PNG of the expected size whose pixels show something (not a blank canvas)."""

import numpy as np
import pytest
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
    read_png(tmp_path / "m.png", (800, 360))
    assert path == str(tmp_path / "m.png")
    curves = {name: [cell(1.0 - 0.1 * s) for s in range(5)] for name in ("a", "b")}
    plotting.plot_curves(curves, tmp_path / "c.png", "step", "loss", figsize=(7, 3.6))
    read_png(tmp_path / "c.png", (700, 360))
