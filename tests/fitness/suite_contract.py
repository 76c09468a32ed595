"""The plug-in contract, checked the same way for every task suite (imported by the suites' tests)."""
from __future__ import annotations

import math

from engine.genome import compile_genome
from engine.plugins import load_fitness
from fitness.base import Score, is_protected, validate_artefacts


def check_suite_contract(name: str, options: dict) -> Score:
    """Load ``name`` through the registry with ``options``, check the contract end to end on
    its baseline seed, and return the baseline's score."""
    plugin = load_fitness(name, options)
    assert plugin.name == name
    assert is_protected(plugin), "a suite scores in the trusted phase"
    seeds = plugin.seeds()
    assert seeds[0].name == plugin.baseline
    for seed in seeds:
        plugin.interface.check(compile_genome(seed.code, plugin.interface.arg_counts))
    fn = compile_genome(seeds[0].code, plugin.interface.arg_counts)
    descriptors = plugin.descriptors(fn)
    assert list(descriptors) == [d.name for d in plugin.descriptor_space]
    assert all(math.isfinite(v) for v in descriptors.values())
    spec = plugin.artefact_spec(3)
    artefacts = validate_artefacts(plugin.train(fn, 3), spec, plugin.max_artefact_bytes)
    score = plugin.score(artefacts, 3)
    assert isinstance(score, Score) and math.isfinite(score.fitness)
    assert score.fitness == 0.0, "the baseline's gain over itself is exactly 0"
    assert plugin.evaluate(fn, 3).fitness == score.fitness
    tasks = {task.name for task in plugin.tasks}
    assert set(score.metrics["per_task"]) == tasks
    assert {r["task"] for r in score.metrics["results"]} == tasks
    for record in score.metrics["results"]:
        assert record["score"] == record["baseline"] and record["gain"] == 0.0
    return score
