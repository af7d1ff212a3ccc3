"""The operator's own LoraAdapter index: events, and LISTs merged without undoing newer events."""

from __future__ import annotations

from loraplex.operator.adapter_index import AdapterIndex
from loraplex.operator.adapters import AdapterView


def body(name: str, base: str = "llama3", rv: str = "1", namespace: str = "ns") -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "resourceVersion": rv},
            "spec": {"baseModel": base, "source": f"s3://bucket/{name}"}}


def names(index: AdapterIndex, base: str = "llama3") -> dict[str, str]:
    return {view.name: view.resource_version for view in index.get(("ns", base))}


def test_events_add_move_and_remove_adapters():
    index = AdapterIndex()
    index.put(AdapterView.from_body(body("math")))
    index.put(AdapterView.from_body(body("squad")))
    index.put(AdapterView.from_body(body("math", base="mistral", rv="2")))  # its spec now names another model
    assert names(index) == {"squad": "1"} and names(index, "mistral") == {"math": "2"}
    index.remove("ns", "squad")
    assert list(index.get(("ns", "llama3"))) == [] and list(index) == [("ns", "mistral")]
    assert len(index) == 1


def test_a_list_fills_an_empty_index_and_drops_what_is_gone():
    index = AdapterIndex()
    index.merge_list([body("math"), body("squad")], index.changes)
    assert names(index) == {"math": "1", "squad": "1"}
    index.merge_list([body("math", rv="5")], index.changes)  # squad was deleted and no event said so
    assert names(index) == {"math": "5"}


def test_events_during_a_list_win_over_it():
    index = AdapterIndex()
    index.merge_list([body("math"), body("old")], index.changes)
    before = index.changes  # the LIST begins; then, before it answers, events arrive:
    index.put(AdapterView.from_body(body("math", rv="7")))
    index.put(AdapterView.from_body(body("new", rv="8")))
    index.remove("ns", "old")
    index.merge_list([body("math", rv="6"), body("old", rv="6")], before)  # the LIST's older picture
    assert names(index) == {"math": "7", "new": "8"}  # nothing newer undone, nothing deleted brought back
