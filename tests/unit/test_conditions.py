from loraplex.api.conditions import condition, merge_conditions


def test_transition_time_moves_only_when_status_flips():
    first = merge_conditions(None, [condition("Ready", False, "Loading", "0 of 1", 1)], now="T1")
    assert first[0]["lastTransitionTime"] == "T1"
    same = merge_conditions(first, [condition("Ready", False, "Loading", "still 0 of 1", 2)], now="T2")
    assert same[0]["lastTransitionTime"] == "T1"
    assert same[0]["message"] == "still 0 of 1" and same[0]["observedGeneration"] == 2
    flipped = merge_conditions(same, [condition("Ready", True, "Loaded", "1 of 1", 2)], now="T3")
    assert flipped[0]["lastTransitionTime"] == "T3"


def test_condition_status_strings():
    assert condition("X", None, "R", "m", 1)["status"] == "Unknown"
    assert condition("X", True, "R", "m", 1)["status"] == "True"
    assert condition("X", False, "R", "m", 1)["status"] == "False"
