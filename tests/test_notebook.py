"""toy_2d.ipynb: committed executed (full run), free of IPython magics, and its FAST run (every code cell,
about a tenth of the training) produces sane numbers. Needs nothing beyond the project: json + exec, no
Jupyter."""
import json
import math
import pathlib
import warnings

import pytest
import torch

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "toy_2d.ipynb"


def code_cells():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    return [("".join(c["source"]), c) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_plain_python_and_committed_executed():
    cells = code_cells()
    assert len(cells) >= 10
    for i, (src, cell) in enumerate(cells):
        magics = [line for line in src.splitlines() if line.lstrip().startswith(("%", "!"))]
        assert not magics and "get_ipython" not in src, f"code cell {i}: IPython-only syntax {magics}"
        # Executed top to bottom in one kernel, without errors, before it was committed.
        assert cell["execution_count"] == i + 1, f"code cell {i}: execution_count {cell['execution_count']}"
        errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
        assert not errors, f"code cell {i} stored an error"
    outputs = [o for _, cell in cells for o in cell["outputs"]]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= 10, "figures missing from the stored outputs"
    stdout = "".join(o["text"] if isinstance(o["text"], str) else "".join(o["text"])
                     for o in outputs if o["output_type"] == "stream")
    assert "FAST=False" in stdout, (
        "the stored outputs must come from the full run, not SOFLOW_NOTEBOOK_FAST=1")
    assert "| SoFlow, 1 step, chain" in stdout, "the section 4 table is missing from the stored outputs"
    assert "| SoFlow with p = 0.5, 1 step" in stdout, "the section 7 table is missing from the stored outputs"
    assert "| SoFlow from the exact velocity, 1 step" in stdout, "the section 8 table is missing"


@pytest.mark.slow
def test_notebook_fast_run_numbers(monkeypatch):
    """Run every code cell in order in one namespace (FAST, Agg backend), then check its numbers."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    monkeypatch.setenv("SOFLOW_NOTEBOOK_FAST", "1")
    threads, ns = torch.get_num_threads(), {"__name__": "__notebook__"}
    try:
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-interactive.*")     # plt.show() under Agg
            for i, (src, _) in enumerate(code_cells()):
                exec(compile(src, f"{NOTEBOOK.name}, code cell {i}", "exec"), ns)
                plt.close("all")
    finally:
        torch.set_num_threads(threads)                                         # the notebook sets 1
        plt.close("all")
    r = ns["results"]
    assert ns["FAST"] is True

    # Section 2: the exact solution map is accurate with the RK4 steps used, and both schedules share it.
    assert r["rk4_max_error"] < 1e-3
    assert r["schedules_same_end_map"] < 1e-3

    # Section 4: SoFlow's one step against flow matching trained for as many steps.
    table = r["table"]
    for name, row in table.items():
        assert math.isfinite(row["sw"]), name
        assert math.isfinite(row["err"]) or name.startswith("data vs data"), name
    soflow1, fm1 = table["SoFlow, 1 step, chain"], table["flow matching, 1 Euler step"]
    assert soflow1["err"] < 0.3, soflow1                                  # close to the exact map, absolutely
    assert soflow1["err"] < fm1["err"] / 3, (soflow1, fm1)               # far closer than one Euler step
    assert soflow1["sw"] < fm1["sw"] / 2, (soflow1, fm1)                 # and closer to the data in law
    assert table["flow matching, 8 Euler steps"]["err"] < fm1["err"] / 3  # the baseline did learn a velocity
    assert table["data vs data (SW floor)"]["sw"] < soflow1["sw"] < 1.0

    # Section 8: distilled from the exact velocity, one step lands nearer the exact map than SoFlow from data;
    # distilled from fm_net, it lands nearer fm_net's own 50 Euler steps.
    distill = r["distill"]
    from_data, exact = distill["SoFlow from data, 1 step"], distill["SoFlow from the exact velocity, 1 step"]
    from_fm = distill["SoFlow from fm_net, 1 step"]
    assert exact["err"] < from_data["err"], (exact, from_data)
    assert from_fm["err_teacher"] < from_data["err_teacher"], (from_fm, from_data)

    # Section 3: the classic shapes, judged by SW_2 only.
    for name, row in r["shapes"].items():
        assert row["floor"] < row["sw_1"] < 1.0, (name, row)

    # Section 5: every ablation run produced a finite, bounded error.
    assert set(r["ablations"]) == {"lambda", "p", "l -> t schedule", "schedule, parameterization"}
    for name, runs in r["ablations"].items():
        assert all(math.isfinite(x["err"]) and 0 < x["err"] < 5 for x in runs.values()), (name, runs)

    # Section 6: a model trained with guidance strength w lands far closer to the exact guided map for that w
    # than to the exact conditional map without guidance (w = 1), and the w = 1 model the other way round.
    cross = r["cfg_cross"]
    for w in (2.0, 3.0):
        assert cross[w][w] < 0.6 * cross[w][1.0], (w, cross[w])
    assert cross[1.0][1.0] < 0.5 * cross[1.0][3.0], cross[1.0]
    assert all(math.isfinite(e[3.0]) and e[3.0] < cross[1.0][3.0] for e in r["cfg_m"].values()), r["cfg_m"]

    # Section 7: the policy toy, against its known modes and their probabilities P(left | o) (0.12 to 0.88).
    policy = r["policy"]["table"]
    exact, soflow1, soflow2 = (policy[name] for name in ("exact chunks (the toy's sampler)", "SoFlow, 1 step",
                                                          "SoFlow, 2 steps"))
    fm = {k: policy[f"flow matching, {k} Euler step{'s' * (k > 1)}"] for k in (1, 2, 4, 8)}
    # The measures themselves: exact chunks cover both modes up to sampling noise, sigma sqrt(2) from a path.
    assert exact["coverage_max"] < 0.08 and exact["off"] == 0
    assert abs(exact["median"] - 0.05 * 2 ** 0.5) < 0.005
    assert [soflow1["nfe"], soflow2["nfe"]] == [1, 2] and [fm[k]["nfe"] for k in fm] == [1, 2, 4, 8]
    # One SoFlow call: both modes in proportion at every observation, and chunks near a true path.
    for row in (soflow1, soflow2):
        assert row["coverage_mean"] < 0.06 and row["coverage_max"] < 0.1, row
        assert all(0.03 < share < 0.97 for share in row["share"]), row
    assert soflow1["median"] < 0.2 and soflow1["median"] < 0.7 * fm[1]["median"], (soflow1, fm[1])
    assert soflow1["off"] < fm[1]["off"] - 0.2 and soflow2["off"] < soflow1["off"], (soflow1, soflow2, fm[1])
    # One Euler step lands between the modes and picks the likelier one; 8 steps recover both.
    assert fm[1]["coverage_mean"] > 2 * soflow1["coverage_mean"] and fm[1]["sharpening"] > 0.05, fm[1]
    assert fm[8]["coverage_mean"] < 0.06 and fm[8]["median"] < 0.08, fm[8]
    # The preset's adaptive weight (p = 0.5) over-chooses the likelier side; p = 0 does not.
    sharp = policy["SoFlow with p = 0.5, 1 step"]
    assert sharp["sharpening"] > soflow1["sharpening"] + 0.03 and sharp["sharpening"] > 0.02, (sharp, soflow1)
