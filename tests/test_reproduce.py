"""The mixed-numbers experiment: data, a short run of the command, and its analysis helpers."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from inhibmoe_fast import mixed_numbers, reproduce


def test_square_images_count_and_gap():
    rng = np.random.default_rng(0)
    labels = np.arange(10).repeat(20)
    images = mixed_numbers.square_images(labels, rng).reshape(-1, 8, 8)
    for image, label in zip(images, labels):
        assert int((image > 0).sum()) == label
        rows, columns = np.nonzero(image)
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                assert max(abs(rows[i] - rows[j]), abs(columns[i] - columns[j])) >= 2, "squares touch"


def test_dataset_kinds_and_labels():
    images, labels, kinds = mixed_numbers.make_dataset(0)
    assert images.shape == (2 * 1797, 64)
    assert int(kinds.sum()) == 1797
    assert set(labels.tolist()) == set(range(10))
    assert float(images.min()) >= 0.0
    assert float(images.max()) <= 1.0


def test_spearman_matches_definition():
    assert mixed_numbers.spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert mixed_numbers.spearman(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)
    assert math.isnan(mixed_numbers.spearman(np.array([1.0, 1.0]), np.array([1.0, 2.0])))


def test_mixed_numbers_command_short_run(tmp_path, capsys):
    out = tmp_path / "reproduce"
    code = reproduce.main([
        "mixed-numbers", "--seeds", "2", "--epochs", "1", "--configurations", "plain,local,global",
        "--out", str(out), "--no-progress",
    ])
    assert code == 0
    with open(out / "mixed_numbers_accuracy.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["configuration"] for r in rows] == ["plain", "local", "global"]
    assert all(0.0 < float(r["accuracy_mean"]) <= 100.0 for r in rows)
    assert (out / "mixed_numbers_inhibition.png").stat().st_size > 0
    assert (out / "mixed_numbers_entropy.csv").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Spearman" in printed or "spearman" in printed


def test_unknown_configuration_rejected():
    with pytest.raises(SystemExit, match="unknown lateral"):
        reproduce.main(["mixed-numbers", "--configurations", "plain,lateral"])


def test_language_command_short_run(tmp_path):
    out = tmp_path / "language"
    assert reproduce.main(["language", "--steps", "3", "--seeds", "1", "--out", str(out), "--no-progress"]) == 0
    with open(out / "language.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["inhibition"] for r in rows] == ["none", "global"]
    for row in rows:
        assert math.isclose(float(row["perplexity"]), math.exp(float(row["heldout_nll"])), rel_tol=1e-9)
    assert (out / "language_training.png").stat().st_size > 0


def test_language_corpus_split():
    from inhibmoe_fast import language

    train, heldout, vocabulary = language.load_corpus(500)
    assert len(vocabulary) == 500
    assert vocabulary[0] == "<unk>"
    assert len(train) > 8 * len(heldout) > 0
    assert int(train.max()) < 500
