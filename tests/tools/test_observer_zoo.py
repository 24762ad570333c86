"""The observer zoo's driver on a small model (the real run is `ptq observer-zoo`)."""

import torch

from ptqpasses_tools import observer_zoo as oz


def _task():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10)).eval()
    data = [(torch.randn(4, 3, 8, 8),) for _ in range(6)]
    return oz.Task("tiny", "tune", "a conv and a linear", model, data[:4], data[4:],
                   oz._score_classifier)


def test_zoo_runs_the_guarded_default_and_each_observer_and_ranks_them():
    t = _task()
    r = oz.evaluate(t, ["minmax", "mse"], with_peers=False)
    assert set(r["methods"]) == {"default", "minmax", "mse"} and r["compute_ops"] == 2
    d = r["methods"]["default"]
    assert d["int8_compute"] == 2 and d["guard"]["met"] and d["sqnr_db"] > 20
    assert d["guard"]["int16"] == d["guard"]["float"] == 0
    text = oz.markdown(oz._meta(), {"tiny": r}, ["minmax", "mse"], False)
    assert "| tiny | tune | " in text and "[0 int16, 0 float; 2/2]" in text
    assert {x["observer"] for x in oz.rank({"tiny": r}, ["minmax", "mse"], "tune")} == \
        {"minmax", "mse"}


def test_zoo_table_with_the_default_alone(tmp_path):
    r = oz.evaluate(_task(), [], with_peers=False)
    text = oz.markdown(oz._meta(), {"tiny": r}, [], False)
    assert "| model | group | default |" in text and "Ranking" not in text
    assert oz.rank({"tiny": r}, [], "tune") == []
    assert "default" in oz._write(__import__("pathlib").Path(tmp_path), oz._meta(), {"tiny": r},
                                  [], False)
