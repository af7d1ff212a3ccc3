import pytest

from loraplex.api.sources import InvalidSource, parse_source


@pytest.mark.parametrize(("uri", "scheme", "location", "path", "revision"), [
    ("s3://adapters/llama3/math", "s3", "adapters", "llama3/math", None),
    ("gs://my-bucket/math.nemo", "gs", "my-bucket", "math.nemo", None),
    ("https://store.example.com/a/math.tar?sig=1", "https", "store.example.com", "/a/math.tar?sig=1", None),
    ("hf://org/repo", "hf", "org/repo", "", None),
    ("hf://org/repo@v1.2", "hf", "org/repo", "", "v1.2"),
    ("hf://org/repo@main/adapters/math", "hf", "org/repo", "adapters/math", "main"),
    ("file:///adapter-store/math/", "file", "", "/adapter-store/math", None),
])
def test_valid_sources(uri, scheme, location, path, revision):
    ref = parse_source(uri)
    assert (ref.scheme, ref.location, ref.path, ref.revision) == (scheme, location, path, revision)


@pytest.mark.parametrize(("uri", "complaint"), [
    ("s3://A_B/x", "not a valid bucket name"),
    ("s3://bucket", "name the adapter's object or prefix"),
    ("https://host/", "needs a path"),
    ("https://user:pw@host/a", "credentials in the storage Secret"),
    ("hf://just-org", "expected hf://org/repo"),
    ("hf://org/repo@", "must be followed by a revision"),
    ("file://host/path", "absolute path"),
    ("file:///store/../etc", "without '..'"),
    ("ftp://x/y", "scheme must be one of"),
])
def test_invalid_sources_name_the_problem(uri, complaint):
    with pytest.raises(InvalidSource, match="source") as excinfo:
        parse_source(uri)
    assert complaint in str(excinfo.value)
    assert uri in str(excinfo.value)
