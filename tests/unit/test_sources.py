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


def test_a_tarred_adapter_with_an_escaping_member_is_refused_before_extraction(tmp_path):
    import asyncio
    import io
    import tarfile

    import aiohttp

    from loraplex.api.types import FailureReason
    from loraplex.sources import Downloader, Progress, SourceError

    store = tmp_path / "store"
    (store / "evil").mkdir(parents=True)
    with tarfile.open(store / "evil" / "evil.tar", "w") as archive:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))

    async def fetch() -> None:
        async with aiohttp.ClientSession() as session:
            await Downloader(session, store_root=store).fetch(f"file://{store}/evil", tmp_path / "staging",
                                                              Progress())

    with pytest.raises(SourceError) as caught:
        asyncio.run(fetch())
    assert caught.value.reason == FailureReason.VALIDATION_FAILED
    assert caught.value.message == "evil.tar: member '../escape.txt' climbs out of the archive with '..'"
    assert not (tmp_path / "escape.txt").exists()
