import io

import numpy as np
import pytest

from psydef.core.labels import LABEL_NAMES
from psydef.core.metrics import (confusion, evaluate, official_macro_f1, per_class_report, plot_class_distribution,
                            plot_confusion_matrix, plot_per_class_f1)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Level 0: 2 true, both right. Level 1: 2 true, 1 right, 1 predicted as 0. Level 7: 3 true, all right,
# plus one false positive from level 2. Level 2: 1 true, missed. Levels 3..6 and 8: absent.
Y_TRUE = [0, 0, 1, 1, 7, 7, 7, 2]
Y_PRED = [0, 0, 1, 0, 7, 7, 7, 7]
F1_0 = 2 * 2 / (2 * 2 + 1)      # tp=2, fp=1, fn=0
F1_1 = 2 * 1 / (2 * 1 + 0 + 1)  # tp=1, fp=0, fn=1
F1_7 = 2 * 3 / (2 * 3 + 1)      # tp=3, fp=1, fn=0


def test_official_macro_f1_excludes_level_0_and_counts_absent_levels_as_zero():
    assert official_macro_f1(Y_TRUE, Y_PRED) == pytest.approx((F1_1 + F1_7) / 8)
    # Correct level-0 items add nothing, but a level-0 item predicted as 1 is a false positive of level 1.
    assert official_macro_f1([0, 0, 3, 7], [0, 0, 3, 3]) == official_macro_f1([3, 7], [3, 3])
    assert official_macro_f1([0, 1], [1, 1]) == pytest.approx((2 / 3) / 8)


def test_evaluate():
    scores = evaluate(np.array(Y_TRUE), np.array(Y_PRED))
    assert set(scores) == {"macro_f1", "macro_f1_all", "accuracy", *(f"f1_level_{i}" for i in range(9))}
    assert scores["macro_f1"] == pytest.approx((F1_1 + F1_7) / 8)
    assert scores["macro_f1_all"] == pytest.approx((F1_0 + F1_1 + F1_7) / 9)
    assert scores["accuracy"] == pytest.approx(6 / 8)
    assert scores["f1_level_0"] == pytest.approx(F1_0)
    assert scores["f1_level_2"] == 0.0 and scores["f1_level_8"] == 0.0
    assert all(type(value) is float for value in scores.values())


def test_per_class_report():
    report = per_class_report(Y_TRUE, Y_PRED)
    assert list(report.columns) == ["level", "name", "precision", "recall", "f1", "support"]
    assert report["level"].tolist() == list(range(9)) and report["name"].tolist() == list(LABEL_NAMES)
    assert report["support"].tolist() == [2, 2, 1, 0, 0, 0, 0, 3, 0]
    row = report.set_index("level")
    assert (row.loc[0, "precision"], row.loc[0, "recall"]) == pytest.approx((2 / 3, 1.0))
    assert (row.loc[1, "precision"], row.loc[1, "recall"]) == pytest.approx((1.0, 0.5))
    assert (row.loc[7, "precision"], row.loc[7, "f1"]) == pytest.approx((3 / 4, F1_7))


def test_confusion_is_9x9_rows_true():
    matrix = confusion(Y_TRUE, Y_PRED)
    assert matrix.shape == (9, 9) and matrix.sum() == len(Y_TRUE)
    assert matrix[1, 0] == 1 and matrix[2, 7] == 1 and matrix[7, 7] == 3


def _png(figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def test_plots_are_figures_of_the_scores():
    """The plot functions write nothing: they return figures (the stages log them), which render as PNG."""
    matrix = plot_confusion_matrix(Y_TRUE, Y_PRED, title="fold 0")
    ax = matrix.axes[0]
    assert ax.get_title() == "fold 0"
    assert sum(int(text.get_text()) for text in ax.texts) == len(Y_TRUE)  # one count per cell
    f1 = plot_per_class_f1(Y_TRUE, Y_PRED)
    heights = [bar.get_height() for bar in f1.axes[0].patches]
    np.testing.assert_allclose(heights, per_class_report(Y_TRUE, Y_PRED)["f1"])
    stacked = plot_class_distribution(Y_TRUE, augmented_labels=[2, 2, 8])
    assert [bar.get_height() for bar in stacked.axes[0].patches][9:] == [0, 0, 2, 0, 0, 0, 0, 0, 1]
    for figure in (matrix, f1, stacked, plot_class_distribution(Y_TRUE)):
        png = _png(figure)
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
