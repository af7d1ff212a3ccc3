from loraplex.operator.apply import is_subset


def test_server_defaults_do_not_count_as_drift():
    desired = {"spec": {"ports": [{"name": "http", "port": 80}], "selector": {"a": "b"}}}
    live = {"spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}], "selector": {"a": "b"},
                     "clusterIP": "10.0.0.1"}}
    assert is_subset(desired, live)


def test_changed_or_removed_fields_are_drift():
    desired = {"spec": {"replicas": 2, "args": ["--a", "--b"]}}
    assert not is_subset(desired, {"spec": {"replicas": 3, "args": ["--a", "--b"]}})
    assert not is_subset(desired, {"spec": {"replicas": 2, "args": ["--a"]}})
    assert not is_subset(desired, {"spec": {"args": ["--a", "--b"]}})
    assert not is_subset(desired, {"spec": {"replicas": 2, "args": ["--a", "--b", "--c"]}})
