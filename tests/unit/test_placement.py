"""Placement of adapters on replica slots: stable, minimal movement, never over capacity."""

from __future__ import annotations

import math

import pytest

from loraplex.operator.placement import (
    BALANCE,
    Capacity,
    Claim,
    assign_slots,
    moved,
    place,
    ranking,
)

MANY = [Claim(f"adapter-{i:04d}", replicas=3) for i in range(2000)]


def test_each_adapter_gets_the_replicas_it_wants_on_distinct_slots_whatever_the_slot_order():
    slots = list(range(20))
    placement = place(slots, MANY, Capacity())
    assert all(len(set(held)) == 3 for held in placement.slots.values())
    assert placement.shortfalls == {}
    assert place(list(reversed(slots)), MANY, Capacity()) == placement


def test_an_adapter_without_a_count_is_on_every_replica_and_one_asking_too_many_on_all_there_are():
    placement = place([0, 1, 2], [Claim("everywhere"), Claim("greedy", replicas=5)], Capacity())
    assert sorted(placement.slots["everywhere"]) == [0, 1, 2]
    assert sorted(placement.slots["greedy"]) == [0, 1, 2]
    assert placement.shortfalls == {}


def test_with_room_everywhere_the_ranking_alone_decides():
    placement = place(list(range(20)), MANY, Capacity())
    assert max(len(placement.held_by(slot)) for slot in range(20)) < math.ceil(BALANCE * 3 * len(MANY) / 20)
    for key, held in placement.slots.items():
        assert list(held) == ranking(key, range(20))[:3]


def test_scaling_up_moves_about_one_replica_in_n_plus_one_and_only_onto_the_new_slot():
    before = place(list(range(20)), MANY, Capacity())
    after = place(list(range(21)), MANY, Capacity())
    added = moved(before, after)
    expected = 3 * len(MANY) / 21
    assert 0.8 * expected < added < 1.25 * expected
    for key, held in after.slots.items():
        assert set(held) - set(before.slots[key]) <= {20}


def test_scaling_down_moves_only_the_replicas_the_removed_slot_held():
    before = place(list(range(21)), MANY, Capacity())
    remaining = [slot for slot in range(21) if slot != 7]
    after = place(remaining, MANY, Capacity())
    held_by_seven = set(before.held_by(7))
    for key, held in after.slots.items():
        lost = set(before.slots[key]) - set(held)
        assert lost == ({7} if key in held_by_seven else set())
        assert len(set(held) - set(before.slots[key])) == (1 if key in held_by_seven else 0)
    assert moved(before, after) == len(held_by_seven)


def test_no_replica_holds_more_than_its_share_of_the_adapters_when_capacity_allows():
    placement = place(list(range(20)), MANY, Capacity())
    counts = [len(placement.held_by(slot)) for slot in range(20)]
    assert max(counts) <= math.ceil(BALANCE * 3 * len(MANY) / 20)


def test_capacity_is_never_exceeded_and_the_earlier_adapters_keep_their_places():
    claims = [Claim(f"a{i}", replicas=2, size_bytes=100) for i in range(10)]
    placement = place([0, 1, 2], claims, Capacity(adapters=5, bytes=450))
    for slot in range(3):
        assert len(placement.held_by(slot)) <= 4  # 450 bytes hold four 100-byte adapters
    full = [d.key for d in claims if len(placement.slots[d.key]) < 2]
    assert full and full == [d.key for d in claims][-len(full):]
    # 450 bytes fill up before 5 adapters do: only the limit that stood in the way is named.
    assert placement.shortfalls[full[-1]] == (
        "wants 2 replica(s) but only 0 of 3 have room (each holds at most 450 bytes): "
        "add replicas or raise the capacity per replica")


def test_an_adapter_larger_than_a_replica_is_not_placed_and_says_why():
    placement = place([0, 1], [Claim("huge", replicas=1, size_bytes=2000)], Capacity(bytes=1000))
    assert placement.slots["huge"] == ()
    assert placement.shortfalls["huge"] == ("its 2000 bytes exceed what one replica holds (1000 bytes): raise the "
                                           "base model's bytes per replica")


def test_without_replicas_nothing_is_placed():
    placement = place([], [Claim("math", replicas=1)], Capacity())
    assert placement.slots == {"math": ()}
    assert placement.shortfalls == {"math": "no replica runs"}


def test_the_balance_bound_yields_where_only_it_stands_in_the_way():
    # Four adapters on all of two slots: the bound is ceil(1.25 * 8 / 2) = 5, the capacity 4; every one fits.
    claims = [Claim(f"a{i}") for i in range(4)]
    placement = place([0, 1], claims, Capacity(adapters=4))
    assert placement.shortfalls == {} and all(len(held) == 2 for held in placement.slots.values())


def test_repeated_slots_or_adapters_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        place([1, 1], [Claim("math")], Capacity())
    with pytest.raises(ValueError, match="once"):
        place([1], [Claim("math"), Claim("math")], Capacity())


def test_pods_keep_their_slots_and_a_replacement_takes_the_one_freed():
    slots = assign_slots({}, ["pod-c", "pod-a", "pod-b"])
    assert slots == {"pod-a": 0, "pod-b": 1, "pod-c": 2}
    # pod-b is deleted and its ReplicaSet starts pod-d: pod-d inherits slot 1, and with it pod-b's adapters.
    assert assign_slots(slots, ["pod-a", "pod-c", "pod-d"]) == {"pod-a": 0, "pod-c": 2, "pod-d": 1}
    # Scaling up takes fresh slots after the held ones.
    assert assign_slots(slots, ["pod-a", "pod-b", "pod-c", "pod-e"])["pod-e"] == 3


def test_two_pods_claiming_one_slot_are_refused():
    with pytest.raises(ValueError, match="same slot"):
        assign_slots({"pod-a": 0, "pod-b": 0}, ["pod-a", "pod-b"])
