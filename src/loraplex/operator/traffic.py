"""Shared model names (LoraAdapter spec.traffic): which adapters get a share of a model name's requests now.

Adapters naming the same model share its requests by weight while they serve. One that fails (validation or
loading, on any replica) is withdrawn, which is the rollback of a bad new version; one loaded nowhere yet
gets nothing, so a new version takes traffic only once it can answer. Only when no healthy adapter is left do
the failed ones that still serve somewhere keep it. Pure: the reconciler gathers the inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from loraplex.api.types import AdapterPhase, ModelTraffic, TrafficTarget, WithheldTarget


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One adapter whose spec.traffic names `model`, and what the operator last decided of it."""

    adapter: str
    served_name: str
    model: str
    weight: int
    phase: str | None  # None: not decided yet
    serving: bool  # loaded on at least one replica


def plan_traffic(candidates: Iterable[Candidate], served_names: Mapping[str, str],
                 routing_problem: str | None, base_model: str | None = None) -> list[ModelTraffic]:
    """Per model name, the adapters its requests go to and those withheld. `served_names` maps each served name
    of the base model's accepted adapters to its adapter; `routing_problem` says why nothing is rewritten;
    `base_model` is the name the runtime serves the base model under, never taken either."""
    by_model: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_model.setdefault(candidate.model, []).append(candidate)
    return [_plan_model(model, sorted(named, key=lambda c: c.adapter), served_names, routing_problem, base_model)
            for model, named in sorted(by_model.items())]


def _plan_model(model: str, named: list[Candidate], served_names: Mapping[str, str],
                routing_problem: str | None, base_model: str | None) -> ModelTraffic:
    if routing_problem is not None:
        return ModelTraffic(model=model, problem=routing_problem)
    if model == base_model:
        return ModelTraffic(model=model, problem=(
            f"{model!r} is the base model's own name: rewriting it would send every request for the base model to "
            "adapters"))
    owner = served_names.get(model)
    if owner is not None and owner not in {c.adapter for c in named}:
        return ModelTraffic(model=model, problem=(
            f"{model!r} is the served name of LoraAdapter {owner}, whose spec.traffic does not name it: rewriting "
            f"it would take {owner}'s own requests away. Give {owner} spec.traffic.model {model!r} too, or use "
            "another model name"))
    healthy = [c for c in named if c.serving and c.phase != AdapterPhase.FAILED]
    chosen = healthy or [c for c in named if c.serving]
    chosen_names = ", ".join(c.adapter for c in chosen) or "no adapter"
    withheld = []
    for candidate in named:
        if candidate in chosen:
            continue
        if candidate.phase == AdapterPhase.FAILED:
            reason = f"it is Failed; the requests go to {chosen_names}"
        else:
            reason = f"it is {candidate.phase or 'not decided yet'} and loaded on no replica"
        withheld.append(WithheldTarget(adapter=candidate.adapter, reason=reason))
    return ModelTraffic(
        model=model,
        targets=[TrafficTarget(adapter=c.adapter, served_name=c.served_name, weight=c.weight) for c in chosen] or None,
        withheld=withheld or None,
        problem=None if chosen else "No adapter naming it is loaded on any replica",
    )
