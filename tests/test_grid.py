import dataclasses

from harness.config import parse_grid
from harness.grid import expand_grid
from harness.work import group_specs

from conftest import check_golden, tiny_grid


def test_trial_ids_golden_for_a_2x2x1_grid():
    grid = tiny_grid(epochs=200, batch_size=[32, 500], learning_rate=[0.01, 0.001], seed=[0])
    lines = [f"{s.trial_id} batch_size={s.batch_size} learning_rate={s.learning_rate!r} seed={s.seed}"
             for s in expand_grid(grid)]
    check_golden("trial_ids_2x2x1.txt", "\n".join(lines) + "\n")


def test_ids_do_not_depend_on_key_or_value_order():
    a = parse_grid({"sweep": {"seed": [1, 0], "learning_rate": [1e-5, 4e-5], "batch_size": [8]}}, "a")
    b = parse_grid({"sweep": {"batch_size": [8], "learning_rate": [4e-5, 1e-5], "seed": [0, 1]}}, "b")
    ids_a = {s.trial_id for s in expand_grid(a)}
    assert ids_a == {s.trial_id for s in expand_grid(b)}
    assert len(ids_a) == 4  # 1e-5 and 4e-5 are different trials


def test_id_changes_with_any_config_value():
    spec = expand_grid(tiny_grid())[0]
    changed = [
        dataclasses.replace(spec, seed=spec.seed + 1),
        dataclasses.replace(spec, train=dataclasses.replace(spec.train, momentum=0.5)),
        dataclasses.replace(spec, problem=dataclasses.replace(spec.problem, cluster_std=1.0)),
        dataclasses.replace(spec, model=dataclasses.replace(spec.model, hidden_units=7)),
    ]
    assert len({spec.trial_id, *(c.trial_id for c in changed)}) == 5


def test_overlapping_blocks_give_each_trial_once():
    grid = parse_grid({"sweep": [
        {"batch_size": [1, 2], "learning_rate": [0.1], "seed": [0]},
        {"batch_size": [2, 4], "learning_rate": [0.1], "seed": [0]},
    ]}, "g")
    assert sorted(s.batch_size for s in expand_grid(grid)) == [1, 2, 4]


def test_data_depends_on_problem_only():
    specs = expand_grid(tiny_grid(seed=[0, 1]))
    assert len({s.problem for s in specs}) == 1


def test_fused_groups_share_batch_size_and_keras_trials_run_alone():
    grid = parse_grid({"train": {"engine": "fused"}, "sweep": {
        "batch_size": [1, 32], "learning_rate": [0.1, 0.01], "seed": [0, 1, 2], "momentum": [0.0, 0.9]}}, "g")
    groups = group_specs(expand_grid(grid))
    assert sorted(len(g) for g in groups) == [12, 12]
    assert all(len({s.batch_size for s in g}) == 1 for g in groups)
    assert groups[0][0].batch_size == 1  # costliest first
    keras = group_specs(expand_grid(tiny_grid()))
    assert [len(g) for g in keras] == [1, 1]
    assert keras[0][0].batch_size == 100  # more updates, so first
