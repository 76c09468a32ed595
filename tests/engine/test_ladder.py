"""The fidelity ladder: option routing, promotion rules, the engine climbing stages."""
import json
import math

import pytest

from archives.store import RunStore
from engine.cli import main
from engine.config import RunConfig
from engine.engine import Engine
from engine.executor import SerialExecutor
from engine.ladder import parse_fitness, promote_asha, promote_generation, split_options, stage_labels
from engine.plugins import load_fitness, load_operator
from tests.conftest import FIXTURES, JITTER_SPEC

TIMED = f"{FIXTURES / 'timed.py'}:TimedRegression"
OTHER = f"{FIXTURES / 'timed.py'}:OtherContract"


def test_fitness_ladder_is_parsed_from_text_or_list():
    assert parse_fitness("synthetic-pref > dpo") == ["synthetic-pref", "dpo"]
    assert parse_fitness(["a", "b", "c"]) == ["a", "b", "c"]
    assert parse_fitness("dpo") == ["dpo"]
    with pytest.raises(ValueError, match="ladder"):
        parse_fitness("a>>b")


def test_options_reach_the_stage_they_name_and_the_rest_go_to_the_last():
    stages = split_options(["synthetic-pref", "dpo"], {
        "synthetic-pref.steps": 40, "preset": "tiny", "dpo.scorer": "heldout", "dpo": {"epochs": 1}})
    assert stages[0].options == {"steps": 40}
    assert stages[1].options == {"preset": "tiny", "scorer": "heldout", "epochs": 1}
    same = split_options(["cifar10", "cifar10"], {"cifar10@0.preset": "cpu", "cifar10.seed": 1, "epochs": 9})
    assert same[0].options == {"preset": "cpu", "seed": 1}
    assert same[1].options == {"seed": 1, "epochs": 9}
    assert split_options(["x"], {"a.b": 1})[0].options == {"a.b": 1}  # one stage: options as written
    assert stage_labels(["cifar10", "cifar10", "dpo"]) == ["cifar10@0", "cifar10@1", "dpo"]


def test_generational_rule_promotes_the_top_fraction_rounded_up():
    scores = {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.9, 5: 0.7}
    assert promote_generation(scores, 0.25, None) == [2, 4]  # ceil(1.25) = 2, ties to the older
    assert promote_generation(scores, 0.4, None) == [2, 4]
    assert promote_generation(scores, 1.0, 0.6) == [2, 4, 5]
    assert promote_generation(scores, 0.25, 0.95) == []
    assert promote_generation({}, 0.25, None) == []


def test_asynchronous_rule_waits_until_a_score_ranks_in_the_top_fraction():
    assert promote_asha({1: 0.9, 2: 0.1, 3: 0.2}, set(), 0.25, None) == []  # floor(0.75) = 0
    scores = {1: 0.9, 2: 0.1, 3: 0.2, 4: 0.3}
    assert promote_asha(scores, set(), 0.25, None) == [1]
    assert promote_asha(scores, {1}, 0.25, None) == []
    scores.update({5: 0.95, 6: 0.0, 7: 0.0, 8: 0.0})
    assert promote_asha(scores, {1}, 0.25, None) == [5]
    assert promote_asha(scores, set(), 0.5, 0.92) == [5]


def ladder_engine(tmp_path, stage_options, **settings):
    config = RunConfig(fitness=[TIMED] * len(stage_options), operator=JITTER_SPEC, executor="serial",
                       out=str(tmp_path / "run"), **{"pop": 6, "gens": 3, "promote_baseline": False, **settings})
    store = RunStore.create(config.out, config.to_dict())
    stages = [load_fitness(TIMED, options) for options in stage_options]
    engine = Engine(config, stages, [load_operator(JITTER_SPEC)], store)
    return engine, store, SerialExecutor([(TIMED, options) for options in stage_options])


def test_ladder_promotes_exactly_the_top_fraction_of_each_generation(tmp_path):
    engine, store, executor = ladder_engine(tmp_path, [{}, {"offset": 100.0}], promote=0.25)
    engine.run(executor)
    cheap, dear = engine.labels
    assert (cheap, dear) == ("timed-regression@0", "timed-regression@1")
    scored = {name: {r.candidate_id: r for n, r in store.evaluations(name)} for name in engine.labels}
    assert len(scored[cheap]) == len(store.candidates()) == 6 + 6 * 3
    for generation in range(4):
        members = [c.id for c in store.candidates() if c.generation == generation]
        ok = sorted((c for c in members if scored[cheap][c].ok), key=lambda c: (-scored[cheap][c].fitness, c))
        expected = set(ok[:math.ceil(0.25 * len(ok))])
        assert {c for c in members if c in scored[dear]} == expected
    # Every score is kept per candidate, and the expensive stage's score is its own.
    for cid, result in scored[dear].items():
        assert result.fitness == pytest.approx(scored[cheap][cid].fitness + 100.0)
    # The archive and the best loss come from the most expensive stage reached.
    best, score = engine.best()
    assert best.id in scored[dear] and score == scored[dear][best.id].fitness
    elites = json.loads((tmp_path / "run" / "archive.json").read_text())
    summary = next(iter(elites["summary"].values()))
    assert summary["fitness"] == dear and summary["fidelity_ladder"] == [cheap, dear]
    assert {e["id"] for e in elites["elites"].values()} <= set(scored[dear])
    record = store.generations()[-1]["record"]
    assert record["stages"][dear]["evals"] == len([c for c in scored[dear]
                                                   if store.candidates()[c].generation == 3])


def test_a_loss_that_fails_a_cheap_stage_never_reaches_an_expensive_one(tmp_path):
    engine, store, executor = ladder_engine(tmp_path, [{"fail_above": 4.5}, {}], promote=1.0, gens=2)
    engine.run(executor)
    cheap = {r.candidate_id: r for _, r in store.evaluations(engine.labels[0])}
    dear = {r.candidate_id: r for _, r in store.evaluations(engine.labels[1])}
    failed = {cid for cid, r in cheap.items() if not r.ok}
    assert failed, "the fixture's threshold should fail some losses"
    assert not failed & set(dear)
    assert set(dear) == set(cheap) - failed


def test_threshold_limits_promotion(tmp_path):
    engine, store, executor = ladder_engine(tmp_path, [{}, {}], promote=1.0, promote_above=-3.0, gens=1)
    engine.run(executor)
    cheap = {r.candidate_id: r for _, r in store.evaluations(engine.labels[0])}
    dear = {r.candidate_id for _, r in store.evaluations(engine.labels[1])}
    assert dear == {cid for cid, r in cheap.items() if r.ok and r.fitness >= -3.0}


def test_cli_runs_a_ladder_with_stage_options(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--fitness", f"{TIMED}>{TIMED}", "--fitness-opt", f"{TIMED}@0.offset=1.0",
                 "--fitness-opt", "offset=50.0", "--operator", JITTER_SPEC, "--pop", "4", "--gens", "1",
                 "--promote", "0.5", "--workers", "2", "--out", str(out), "--quiet"])
    assert code == 0
    store = RunStore.open(out)
    cheap = {r.candidate_id: r for _, r in store.evaluations("timed-regression@0")}
    dear = {r.candidate_id: r for _, r in store.evaluations("timed-regression@1")}
    assert len(cheap) == len(store.candidates()) and 0 < len(dear) < len(cheap)
    for cid, result in dear.items():
        assert result.fitness == pytest.approx(cheap[cid].fitness + 49.0)
    assert store.meta("fidelity_ladder") == ["timed-regression@0", "timed-regression@1"]


def test_stages_with_different_contracts_are_refused(tmp_path, capsys):
    code = main(["run", "--fitness", f"{TIMED}>{OTHER}", "--operator", JITTER_SPEC, "--out", str(tmp_path / "r"),
                 "--quiet"])
    assert code == 2
    assert "different function contracts" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_promote_must_be_a_fraction(value):
    with pytest.raises(ValueError, match="promote must be a fraction"):
        RunConfig(promote=value)


def test_toml_ladder_with_a_table_per_stage(tmp_path):
    from engine.config import load_toml

    path = tmp_path / "run.toml"
    path.write_text('fitness = ["synthetic-pref", "dpo"]\npromote = 0.5\n'
                    '[fitness_options]\npreset = "tiny"\n[fitness_options.synthetic-pref]\nsteps = 40\n'
                    '[fitness_options.dpo]\nscorer = "heldout"\n')
    config = RunConfig.from_dict(load_toml(path))
    stages = config.stages()
    assert [s.spec for s in stages] == ["synthetic-pref", "dpo"]
    assert stages[0].options == {"steps": 40}
    assert stages[1].options == {"preset": "tiny", "scorer": "heldout"}
    assert config.promote == 0.5


def test_the_baseline_seed_climbs_every_stage_it_passes(tmp_path):
    engine, store, executor = ladder_engine(tmp_path, [{}, {}, {}], promote=0.25, gens=1, promote_baseline=True)
    engine.run(executor)
    mse = next(c.id for c in store.candidates() if c.name == "mse" and c.operator == "seed")
    for label in engine.labels:
        scored = {r.candidate_id for _, r in store.evaluations(label)}
        assert mse in scored  # mse (fitness -4) is not in the top quarter of generation 0, yet has a reference
    ranked = sorted((r for _, r in store.evaluations(engine.labels[0]) if r.ok), key=lambda r: -r.fitness)
    assert mse not in {r.candidate_id for r in ranked[:2]}


@pytest.mark.slow
@pytest.mark.dpo
def test_ladder_example_config_runs_real_dpo_on_the_promoted(tmp_path, capsys):
    from tests.conftest import ROOT

    out = tmp_path / "run"
    assert main(["run", "--config", str(ROOT / "examples" / "ladder.toml"), "--gens", "0", "--pop", "4",
                 "--fitness-opt", "synthetic-pref.instances=1", "--validate-top", "1", "--validate-seeds", "1",
                 "--validate-confirm-seeds", "1", "--out", str(out), "--quiet"]) == 0
    store = RunStore.open(out)
    cheap = {r.candidate_id: r for _, r in store.evaluations("synthetic-pref")}
    dear = {r.candidate_id: r for _, r in store.evaluations("dpo")}
    dpo_seed = next(c.id for c in store.candidates() if c.name == "dpo" and c.operator == "seed")
    assert len(cheap) == 11 and dpo_seed in dear and 2 <= len(dear) <= 1 + math.ceil(0.25 * 11)
    assert all(r.ok and 0.0 <= r.fitness <= 1.0 for r in dear.values())  # held-out preference accuracy
    # The end-of-run validation runs on the first stage's held-out tasks (pref-suite's meta-test
    # split), on the run's best and the baseline, after the ladder's last stage.
    held_out = {r.candidate_id for name, _, r in store.seed_evaluations() if name.startswith("validation:pref-suite")}
    assert held_out == {json.loads((out / "summary.json").read_text())["validation"]["losses"][0]["id"], dpo_seed}
