"""The MSD download path, against a local fake source (never the network)."""

import functools
import hashlib
import http.server
import tarfile
import threading

import pytest

from medseg.data.download import download_task
from medseg.data.integrity import check_dataset
from medseg.data.synthetic import write_synthetic_dataset


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields its base URL."""
    (tmp_path / "www").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_extracts_a_valid_task(tmp_path, served):
    write_synthetic_dataset(tmp_path / "src" / "Task99_Fake", num_cases=2, min_size=16, max_size=18)
    archive = tmp_path / "www" / "Task99_Fake.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "src" / "Task99_Fake", arcname="Task99_Fake")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = download_task("Task99_Fake", tmp_path / "data", url=f"{served}/Task99_Fake.tar", md5=md5)
    assert root == tmp_path / "data" / "Task99_Fake"
    report = check_dataset(root)
    assert report.num_cases == 2 and not report.errors


def test_download_rejects_a_corrupted_archive(tmp_path, served):
    (tmp_path / "www" / "Task99_Fake.tar").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="md5 hash check"):
        download_task("Task99_Fake", tmp_path / "data", url=f"{served}/Task99_Fake.tar", md5="0" * 32)


def test_unknown_task_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match="Task04_Hippocampus"):
        download_task("Task42_Nothing", tmp_path)
